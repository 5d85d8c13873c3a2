"""evaluate: how the round's policy compares with the reference on held-out data.

On the held-out pairs: reward accuracy and margin (implicit reward β·log π/π_ref), ranking
accuracy of the policy alone (and of the reference, for contrast), the loss. On held-out
prompts: one sample each from policy and reference, a sequence-level KL estimate
E_{y~π}[log π(y) − log π_ref(y)], mean response length, and, with a reward function, the
gold reward of both and the policy's win rate against the reference.

Each mean comes with its 95% interval (pipeline.evalstats: seeded bootstrap over the pairs
or prompts), as `<key>_low` / `<key>_high`; a change against the reference is the paired
difference over the same prompts (`eval/gold_gain`, `eval/ranking_gain`). The per-prompt
values (samples.parquet) and per-pair values (pairs.parquet) stay in the stage directory,
so the summary can test a change against the previous round paired over the same prompts.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import (
    EngineConfig,
    LossConfig,
    PoolConfig,
    RunConfig,
    loss_needs,
    validate_loss,
)
from pipeline.evalstats import mean_ci, pair_outcomes, paired_diff_ci, sequence_kl, wins
from workers.rewards import load_reward_fn


def through_engines(rows: list[dict[str, Any]], *maps: tuple[Any, PoolConfig]
                    ) -> list[dict[str, Any]]:
    """`rows` through Ray Data maps of engine UDFs, each `(udf, its pool)`, in one streaming
    execution (a batch goes on to the next pool's engines while the first pool serves the
    next batch), back in their order. Blocks are sized to the first pool's batch, so every
    engine of it is fed."""
    import ray

    from pipeline.blocks import from_table
    from pipeline.engines import map_args

    if not rows:
        return []
    table = pa.Table.from_pylist([{**r, "_row": i} for i, r in enumerate(rows)])
    ds = from_table(table, maps[0][1].batch_size)
    for udf, pool in maps:
        ds = ds.map_batches(udf, batch_format="pyarrow", **map_args(pool))
    out = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("_row")
    return out.drop_columns(["_row"]).to_pylist()


def reference_samples(prompt_rows: list[dict[str, Any]], client: Any, sampling: dict[str, Any],
                      pool: PoolConfig, cache: Path | None, key: str) -> list[dict[str, Any]]:
    """The reference's samples of the eval prompts. They are the same every round and in
    every run of the same reference, prompts and seeded sampling settings (`key` covers
    them), so they are computed once and kept in `cache`/KEY.parquet (written whole, then
    renamed: runs sharing the cache may both compute a key, never read half of one)."""
    from workers.vllm_pool import Sampler

    path = cache / f"{key}.parquet" if cache is not None else None
    if path is not None and path.is_file():
        return pq.read_table(path).to_pylist()
    rows = through_engines(prompt_rows, (Sampler(client, sampling), pool))
    if path is not None and rows:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(path)
    return rows


def eval_pair_logps(pairs: list[dict[str, Any]], pol_c: list[list[float]],
                    pol_r: list[list[float]], needs: frozenset[str],
                    pol_kl: tuple[list[list[float]], list[list[float]]] | None = None,
                    pol_sq: tuple[list[list[float]], list[list[float]]] | None = None,
                    running_mean: float | None = None):
    """The eval pairs as a PairLogps with what the loss `needs`: per-token policy log-probs
    `pol_c`/`pol_r` (chosen, rejected), the reference columns of the reference stage, prefix
    sums (ld_dpo), the mismatched completions' policy log-probs `pol_kl` (kto), per-token
    log Σ_v p(v)² `pol_sq` (wpo), training's final running mean (bco). An eval pair is a
    labelled pair, so each response's win rate against the other (sppo) is 1 and 0."""
    import torch

    from workers.losses import PairLogps

    f64 = lambda xs: torch.tensor(xs, dtype=torch.float64)
    shared = [min(len(c), len(r)) for c, r in zip(pol_c, pol_r)]
    logps = PairLogps(
        policy_chosen=f64([sum(x) for x in pol_c]), policy_rejected=f64([sum(x) for x in pol_r]),
        ref_chosen=f64([p["ref_chosen_logp"] for p in pairs]),
        ref_rejected=f64([p["ref_rejected_logp"] for p in pairs]),
        chosen_len=f64([len(x) for x in pol_c]), rejected_len=f64([len(x) for x in pol_r]),
        chosen_score=f64([p["chosen_score"] for p in pairs]),
        rejected_score=f64([p["rejected_score"] for p in pairs]),
        policy_chosen_prefix=f64([sum(x[:k]) for x, k in zip(pol_c, shared)]),
        policy_rejected_prefix=f64([sum(x[:k]) for x, k in zip(pol_r, shared)]),
        ref_chosen_prefix=f64([p["ref_chosen_prefix_logp"] for p in pairs]),
        ref_rejected_prefix=f64([p["ref_rejected_prefix_logp"] for p in pairs]),
    )
    if torch.isnan(logps.chosen_score).any() or torch.isnan(logps.rejected_score).any():
        logps.chosen_score = logps.rejected_score = None
    if "win_rates" in needs:
        logps.chosen_winrate, logps.rejected_winrate = f64([1.0] * len(pairs)), f64([0.0] * len(pairs))
    if "token_stats" in needs:
        logw = [[sum(t - q for t, q in zip(ts, qs)) / max(len(ts), 1)
                 for ts, qs in zip(tokens, sq)] for tokens, sq in zip((pol_c, pol_r), pol_sq)]
        logps.chosen_wpo_logw, logps.rejected_wpo_logw = f64(logw[0]), f64(logw[1])
    if "kl_pairs" in needs:
        logps.kl_policy = f64([sum(x) for side in pol_kl for x in side])
        logps.kl_ref = f64([p[f"ref_kl_{side}_logp"] for side in ("chosen", "rejected")
                            for p in pairs])
    if "running_stats" in needs:
        if running_mean is None:
            raise ValueError("the loss needs training's running mean (train stage output"
                             " final_metrics.running_mean), which is missing")
        logps.bco_delta = running_mean
    return logps


def eval_loss_metrics(loss_cfg: LossConfig, logps) -> dict[str, float]:
    """The loss and its metrics on the eval pairs, prefixed eval/."""
    return eval_pair_metrics(loss_cfg, logps)[0]


def eval_pair_metrics(loss_cfg: LossConfig, logps) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The loss's metrics on the eval pairs (prefixed eval/) with 95% intervals for the
    per-pair ones, and the per-pair values: implicit reward margin, reward accuracy, policy
    and reference ranking (chosen log-prob above rejected)."""
    from workers.losses import compute_loss

    loss = compute_loss(loss_cfg.name, logps, **validate_loss(loss_cfg))
    metrics = {f"eval/{k}": v for k, v in loss.metrics.items()}
    metrics["eval/loss"] = float(loss.mean())
    numpy = lambda t: t.double().numpy()
    per_pair = pair_outcomes(numpy(loss.chosen_rewards), numpy(loss.rejected_rewards),
                             numpy(logps.policy_chosen), numpy(logps.policy_rejected),
                             numpy(logps.ref_chosen), numpy(logps.ref_rejected))
    metrics["eval/ref_ranking_accuracy"] = float(per_pair["ref_ranking"].mean())
    for key, col in (("eval/rewards/margins", "margin"), ("eval/rewards/accuracies", "reward_accuracy"),
                     ("eval/ranking/accuracy", "ranking")):
        ci = mean_ci(per_pair[col])
        metrics.update({f"{key}_low": ci.low, f"{key}_high": ci.high})
    metrics.update(paired_diff_ci(per_pair["ranking"], per_pair["ref_ranking"]).as_metrics("eval/ranking_gain"))
    return metrics, per_pair


def prompt_metrics(kl: np.ndarray, gold_policy: np.ndarray | None = None,
                   gold_reference: np.ndarray | None = None) -> dict[str, float]:
    """KL, gold rewards, the gold gain (paired: same prompts) and the win rate, each with
    its 95% interval, from per-prompt values."""
    metrics = mean_ci(kl).as_metrics("eval/kl")
    if gold_policy is not None and gold_reference is not None:
        metrics.update(mean_ci(gold_policy).as_metrics("eval/gold_policy"))
        metrics.update(mean_ci(gold_reference).as_metrics("eval/gold_reference"))
        metrics.update(paired_diff_ci(gold_policy, gold_reference).as_metrics("eval/gold_gain"))
        metrics.update(mean_ci(wins(gold_policy, gold_reference)).as_metrics("eval/win_rate"))
    return metrics


def run_evaluate(eval_dir: Path, policy_path: str, reference_path: str, cfg: RunConfig,
                 out_dir: Path, engines: Any, running_mean: float | None = None,
                 cache: Path | None = None) -> dict[str, float]:
    """The policy at `policy_path` against the reference at `reference_path`, on the run's
    `engines` (pipeline.engines.Engines: the policy pool loads the policy in place, the
    reference pool the reference). `running_mean`: the train stage's final running mean
    (losses that need running stats). `cache`: where the reference's samples of the eval
    prompts are kept (see reference_samples; None: sampled every time)."""
    from pipeline.engines import pool_config
    from pipeline.manifest import model_digest, stable_hash
    from workers.vllm_pool import Sampler, TokenLogprobs

    # in id order: the files Ray Data wrote hold the pairs in no fixed order, and the
    # bootstrap intervals (and max_pairs) depend on the order
    pairs = sorted(pq.read_table(str(eval_dir)).to_pylist(), key=lambda p: str(p.get("id", "")))
    if cfg.eval.max_pairs:
        pairs = pairs[: cfg.eval.max_pairs]
    needs = loss_needs(cfg.loss)
    # distinct prompts as the model sees them (multi-turn prompts share their last turn)
    prompts: dict[tuple[int, ...], dict[str, Any]] = {}
    for p in pairs:
        prompts.setdefault(tuple(p["prompt_ids"]), {"prompt_ids": p["prompt_ids"],
                                                    "prompt_text": p["prompt_text"]})
    prompt_rows = list(prompts.values())[: cfg.eval.num_prompts]
    p_text = [r["prompt_text"] for r in prompt_rows]
    s = cfg.sampling
    sampling = {"n": 1, "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
                "seed": s.seed}

    policy = engines.client("policy", policy_path)
    reference = engines.client("reference", reference_path)
    sides = ["chosen_ids", "rejected_ids"]
    kl_sides = ["kl_chosen_ids", "kl_rejected_ids"] if "kl_pairs" in needs else []
    # Two independent executions side by side: the policy's log-probs of the eval pairs,
    # and its samples of the eval prompts, each scored by the reference as it comes (while
    # one waits on Ray Data's scheduling, the other's batches are on the engines).
    with ThreadPoolExecutor(2, thread_name_prefix="evaluate") as side_by_side:
        on_pairs = side_by_side.submit(
            through_engines, [{c: p[c] for c in ["prompt_ids", *sides, *kl_sides]} for p in pairs],
            (TokenLogprobs(policy, sides + kl_sides, sides if "token_stats" in needs else ()),
             cfg.sampling))
        on_prompts = side_by_side.submit(
            through_engines, [{"prompt_ids": r["prompt_ids"]} for r in prompt_rows],
            (Sampler(policy, sampling), cfg.sampling),
            (TokenLogprobs(reference, ["response_ids"]), cfg.reference))
        scored, pol_samples = on_pairs.result(), on_prompts.result()
    pol_c = [r["chosen_ids_logps"] for r in scored]
    pol_r = [r["rejected_ids_logps"] for r in scored]
    pol_kl = tuple([r[f"{c}_logps"] for r in scored] for c in kl_sides) if kl_sides else None
    pol_sq = (tuple([r[f"{c}_collisions"] for r in scored] for c in sides)
              if "token_stats" in needs else None)
    ref_key = stable_hash({"reference": model_digest(reference_path), "sampling": sampling,
                           "prompts": [r["prompt_ids"] for r in prompt_rows],
                           "engine": pool_config(cfg, "reference").engine.model_dump(
                               exclude=set(EngineConfig.SCHEDULING_ONLY))})
    ref_samples = reference_samples(prompt_rows, reference, sampling, cfg.reference, cache,
                                    ref_key)

    logps = eval_pair_logps(pairs, pol_c, pol_r, needs, pol_kl, pol_sq, running_mean)
    metrics, per_pair = eval_pair_metrics(cfg.loss, logps)
    metrics["eval/pairs"] = len(pairs)
    metrics["eval/prompts"] = len(prompt_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [str(p.get("id", i)) for i, p in enumerate(pairs)],
                             **{k: v.tolist() for k, v in per_pair.items()}}),
                   out_dir / "pairs.parquet")
    if prompt_rows:
        kl = sequence_kl([x["policy_logp"] for x in pol_samples],
                         [sum(x["response_ids_logps"]) for x in pol_samples])
        metrics["eval/len_policy"] = float(np.mean([len(x["response_ids"]) for x in pol_samples]))
        metrics["eval/len_reference"] = float(np.mean([len(x["response_ids"]) for x in ref_samples]))
        rows = {"prompt": p_text, "policy_response": [x["response"] for x in pol_samples],
                "reference_response": [x["response"] for x in ref_samples], "kl": kl.tolist()}
        gold = cfg.eval.gold_reward or (cfg.reward.function if cfg.reward else None)
        if gold:
            fn = load_reward_fn(gold)
            gp = np.array(fn(p_text, rows["policy_response"]), dtype=float)
            gr = np.array(fn(p_text, rows["reference_response"]), dtype=float)
            metrics.update(prompt_metrics(kl, gp, gr))
            rows.update(gold_policy=gp.tolist(), gold_reference=gr.tolist(),
                        win=wins(gp, gr).tolist())
        else:
            metrics.update(prompt_metrics(kl))
        pq.write_table(pa.table(rows), out_dir / "samples.parquet")
    return metrics
