"""evaluate: how the round's policy compares with the reference on held-out data.

On the held-out pairs: reward accuracy and margin (implicit reward β·log π/π_ref), ranking
accuracy of the policy alone (and of the reference, for contrast), the loss. On held-out
prompts: one sample each from policy and reference, a sequence-level KL estimate
E_{y~π}[log π(y) − log π_ref(y)], mean response length, and, with a reward function, the
gold reward of both and the policy's win rate against the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import PoolConfig, RunConfig, validate_loss
from workers.rewards import load_reward_fn


def _engine_pool(model_path: str, pool: PoolConfig, trust_remote_code: bool, seed: int):
    import ray
    from ray.util import ActorPool

    from workers.vllm_pool import Engine

    remote = ray.remote(num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor,
                        resources=pool.resources)(Engine)
    actors = [remote.remote(model_path, pool.engine.model_dump(), trust_remote_code, seed)
              for _ in range(pool.num_actors)]
    return actors, ActorPool(actors)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _map(pool, method: str, size: int, rows: int, *columns: Sequence[Any], **kwargs) -> list[Any]:
    """Call actor `method` on chunks of `size` rows of `columns`; results in row order."""
    jobs = [[c[s] for c in columns] for s in _chunks(rows, size)]
    out: list[Any] = []
    for part in pool.map(lambda a, job: getattr(a, method).remote(*job, **kwargs), jobs):
        out.extend(part)
    return out


def _kill(actors) -> None:
    import ray

    for a in actors:
        ray.kill(a)


def run_evaluate(eval_dir: Path, policy_path: str, reference_path: str, cfg: RunConfig,
                 out_dir: Path) -> dict[str, float]:
    import torch

    from workers.losses import PairLogps, compute_loss

    pairs = pq.read_table(str(eval_dir)).to_pylist()
    if cfg.eval.max_pairs:
        pairs = pairs[: cfg.eval.max_pairs]
    prompts: dict[str, tuple[list[int], str]] = {}
    for p in pairs:
        prompts.setdefault(p["prompt_text"], (p["prompt_ids"], p["prompt_text"]))
    prompt_rows = list(prompts.values())[: cfg.eval.num_prompts]
    p_ids = [r[0] for r in prompt_rows]
    p_text = [r[1] for r in prompt_rows]
    s = cfg.sampling
    sample_kw = {"n": 1, "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
                     "seed": s.seed}
    size = cfg.sampling.batch_size
    trc = cfg.model.trust_remote_code

    actors, pool = _engine_pool(policy_path, cfg.sampling, trc, s.seed)
    prompt_col = [p["prompt_ids"] for p in pairs]
    pol_c = _map(pool, "sequence_logprobs", size, len(pairs), prompt_col, [p["chosen_ids"] for p in pairs])
    pol_r = _map(pool, "sequence_logprobs", size, len(pairs), prompt_col, [p["rejected_ids"] for p in pairs])
    pol_samples = [x[0] for x in _map(pool, "sample", size, len(p_ids), p_ids, **sample_kw)] if p_ids else []
    _kill(actors)
    actors, pool = _engine_pool(reference_path, cfg.sampling, trc, s.seed)
    ref_samples = [x[0] for x in _map(pool, "sample", size, len(p_ids), p_ids, **sample_kw)] if p_ids else []
    ref_of_pol = _map(pool, "sequence_logprobs", size, len(p_ids), p_ids,
                      [x[0] for x in pol_samples]) if p_ids else []
    _kill(actors)

    f64 = lambda xs: torch.tensor(xs, dtype=torch.float64)
    logps = PairLogps(
        policy_chosen=f64([sum(x) for x in pol_c]), policy_rejected=f64([sum(x) for x in pol_r]),
        ref_chosen=f64([p["ref_chosen_logp"] for p in pairs]),
        ref_rejected=f64([p["ref_rejected_logp"] for p in pairs]),
        chosen_len=f64([len(x) for x in pol_c]), rejected_len=f64([len(x) for x in pol_r]),
        chosen_score=f64([p["chosen_score"] for p in pairs]),
        rejected_score=f64([p["rejected_score"] for p in pairs]),
    )
    if torch.isnan(logps.chosen_score).any() or torch.isnan(logps.rejected_score).any():
        logps.chosen_score = logps.rejected_score = None
    loss = compute_loss(cfg.loss.name, logps, **validate_loss(cfg.loss))
    metrics = {f"eval/{k}": v for k, v in loss.metrics.items()}
    metrics["eval/loss"] = float(loss.mean())
    metrics["eval/ref_ranking_accuracy"] = float((logps.ref_chosen > logps.ref_rejected).double().mean())
    metrics["eval/pairs"] = len(pairs)
    if p_ids:
        kl = np.array([x[1] - sum(r) for x, r in zip(pol_samples, ref_of_pol)])
        metrics["eval/kl"] = float(kl.mean())
        metrics["eval/len_policy"] = float(np.mean([len(x[0]) for x in pol_samples]))
        metrics["eval/len_reference"] = float(np.mean([len(x[0]) for x in ref_samples]))
        rows = {"prompt": p_text, "policy_response": [x[2] for x in pol_samples],
                "reference_response": [x[2] for x in ref_samples], "kl": kl.tolist()}
        gold = cfg.eval.gold_reward or (cfg.reward.function if cfg.reward else None)
        if gold:
            fn = load_reward_fn(gold)
            gp = np.array(fn(p_text, rows["policy_response"]), dtype=float)
            gr = np.array(fn(p_text, rows["reference_response"]), dtype=float)
            metrics["eval/gold_policy"] = float(gp.mean())
            metrics["eval/gold_reference"] = float(gr.mean())
            metrics["eval/win_rate"] = float(np.mean((gp > gr) + 0.5 * (gp == gr)))
            rows.update(gold_policy=gp.tolist(), gold_reference=gr.tolist())
        out_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(rows), out_dir / "samples.parquet")
    return metrics
