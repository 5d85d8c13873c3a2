"""score: the configured reward (function, reward model, judge) scores every sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import RunConfig


def run_score(samples_dir: Path, cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    import ray

    from pipeline.stages.reference import pool_map_args
    from workers.rewards import FunctionScorer, JudgeScorer, RewardModelScorer

    reward = cfg.reward
    pool = pool_map_args(reward)  # reward.num_actors, cpus/gpus_per_actor, resources
    ds = ray.data.read_parquet(str(samples_dir))
    if reward.kind == "function":  # no state to keep: tasks, on Ray's pooled workers
        ds = ds.map_batches(FunctionScorer(reward.function), batch_format="pyarrow", **pool)
    elif reward.kind == "reward_model":
        ds = ds.map_batches(RewardModelScorer, fn_constructor_args=(reward.model,
                                                                    cfg.model.trust_remote_code),
                            batch_format="pyarrow", **pool)
    else:  # judge: all samples of a prompt go to one call, compared with the first
        pool.pop("batch_size")
        ds = ds.groupby("prompt_id").map_groups(
            JudgeScorer, fn_constructor_args=(reward.model, cfg.sampling.engine.model_dump(),
                                              cfg.model.trust_remote_code),
            batch_format="pyarrow", **pool)
    ds = ds.materialize()
    ds.write_parquet(str(out_dir / "scored"))
    scores = [r["score"] for r in ds.select_columns(["score"]).take_all()]
    return {"samples": len(scores), "score_mean": sum(scores) / max(len(scores), 1),
            "score_min": min(scores, default=0.0), "score_max": max(scores, default=0.0)}
