"""score: the configured reward (function, reward model, judge) scores every sample.

A reward function runs in Ray Data tasks (it keeps no state); a reward model or a judge
runs on the run's scorer actors (pipeline.scorers), started once and kept for the run, fed
by thin task UDFs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import ActorPoolConfig, RunConfig


def pool_map_args(pool: ActorPoolConfig) -> dict[str, Any]:
    """map_batches arguments of reward-function tasks: reward.num_actors at once, each
    asking for what reward.*_per_actor and reward.resources say."""
    from ray.data import TaskPoolStrategy

    args = {"compute": TaskPoolStrategy(size=pool.num_actors), "num_cpus": pool.cpus_per_actor,
            "num_gpus": pool.gpus_per_actor or None, "batch_size": pool.batch_size}
    if pool.resources:  # custom resources pin the tasks to node types
        args["resources"] = dict(pool.resources)
    return args


def run_score(samples_dir: Path, cfg: RunConfig, out_dir: Path, scorers: Any = None
              ) -> dict[str, Any]:
    """Score out_dir/scored/ (parquet) from the samples in `samples_dir`; `scorers`
    (pipeline.scorers.Scorers) serves a reward model or a judge."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.blocks import parquet_files, read_parquet
    from pipeline.engines import fused_write_args, map_args
    from workers.rewards import FunctionScorer

    reward = cfg.reward
    ds = read_parquet(samples_dir, reward.batch_size)
    if reward.kind == "function":
        args = pool_map_args(reward)
        ds = ds.map_batches(FunctionScorer(reward.function), batch_format="pyarrow", **args)
    elif reward.kind == "reward_model":  # the actors hold the resources; a UDF only waits
        args = map_args(reward)
        ds = ds.map_batches(scorers.client(), batch_format="pyarrow", **args)
    else:  # judge: all samples of a prompt go to one call, compared with the first
        args = map_args(reward)
        args.pop("batch_size")
        ds = ds.groupby("prompt_id").map_groups(scorers.client(), batch_format="pyarrow", **args)
    out = out_dir / "scored"
    # one execution, the write in the scoring tasks; the summary reads the column it wrote
    ds.write_parquet(str(out), **fused_write_args(args))
    files = [str(f) for f in parquet_files(out)]
    scores = pq.read_table(files, columns=["score"])["score"] if files else pa.array([], pa.float64())
    if not len(scores):
        return {"samples": 0, "score_mean": 0.0, "score_min": 0.0, "score_max": 0.0}
    bounds = pc.min_max(scores)
    return {"samples": len(scores), "score_mean": pc.mean(scores).as_py(),
            "score_min": bounds["min"].as_py(), "score_max": bounds["max"].as_py()}
