"""Reference log-probs: our vLLM pool vs a plain HF batched forward loop vs TRL's precompute,
on the same pairs and model: pairs/s, and the log-prob gap between them.

Our side is the reference stage's own function, `pipeline.stages.reference.compute_reference`
(Ray Data read -> `workers.vllm_pool.PairLogprobs` UDFs -> the run's engine actor,
`pipeline.engines` -> parquet), with the engine subclassed only to time, inside its actor,
its constructor (engine start) and its calls (the engine-only figure;
`harness.timed_vllm_udfs`).
The HF loop (`fixtures.hf_response_logps`: right-padded batches, one forward, log_softmax,
gather) and TRL's `DPOTrainer` precompute (`precompute_ref_log_probs=True`, timed inside its
constructor) each run in a fresh process. All fp32; the gap is per-sequence summed response
log-probs against the HF loop.

    .venv/bin/python bench/bench_reference.py [--pairs 512] [--pool-batch 128] [--hf-batch 32]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fixtures import (
    CACHE,
    DEMO_ENGINE,
    build_bench_model,
    hf_response_logps,
    load_hf,
    load_pairs,
    local_ray,
    set_env,
    trl_config,
    trl_dataset,
    trl_trainer_class,
    write_pairs,
)
from harness import (
    emit,
    in_fresh_process,
    line,
    machine,
    peak_rss_mib,
    print_profile,
    ratio_line,
    read_timings,
    timed_vllm_udfs,
)


def run_pool(model_path: Path, data: Path, pool_batch: int) -> dict[str, Any]:
    """The reference stage's own function on the run's engines (pipeline.engines): the
    stage's wall includes starting the engine, as a run's first reference stage does."""
    import pyarrow.parquet as pq

    from pipeline.config import parse_config
    from pipeline.engines import Engines
    from pipeline.stages.reference import compute_reference

    cfg = parse_config({"model": {"policy": str(model_path)}, "data": {"train": ["-"]},
                        "reference": {"num_actors": 1, "cpus_per_actor": 1,
                                      "batch_size": pool_batch, "engine": DEMO_ENGINE}})
    out = Path(tempfile.mkdtemp(prefix="ref-", dir=CACHE / "reference"))
    try:
        with local_ray(num_cpus=4) as ray_start, timed_vllm_udfs(out / "timings.jsonl") as log:
            t0 = time.perf_counter()
            with Engines(cfg) as engines:
                client = engines.client("reference", str(model_path))
                compute_reference({"train": data}, client, cfg.reference, out)
            wall = time.perf_counter() - t0
        table = pq.read_table(out / "train").to_pandas().sort_values("id")
        timings = [t for t in read_timings(log) if t["cls"] == "Engine"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "ray_start_s": ray_start,
            "engine_s": sum(t["s"] for t in timings if t["what"] == "sequence_logprobs"),
            "init_s": sum(t["s"] for t in timings if t["what"] == "init"),
            "ids": table.id.tolist(), "chosen": table.ref_chosen_logp.tolist(),
            "rejected": table.ref_rejected_logp.tolist()}


def _hf_process(model_path: str, pairs: list[dict[str, Any]], batch: int,
                threads: int | None = None) -> dict[str, Any]:
    set_env()
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = load_hf(Path(model_path))
    prompts = [p["prompt_ids"] for p in pairs]
    t0 = time.perf_counter()
    chosen = hf_response_logps(model, prompts, [p["chosen_ids"] for p in pairs], batch)
    rejected = hf_response_logps(model, prompts, [p["rejected_ids"] for p in pairs], batch)
    return {"s": time.perf_counter() - t0, "chosen": chosen, "rejected": rejected,
            "peak_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


def _trl_process(model_path: str, pairs: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    set_env()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tempfile.mkdtemp(prefix="trl-ref-", dir=CACHE / "reference")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    cfg = trl_config(Path(tmp), per_device_train_batch_size=batch // 2, max_length=128,
                     precompute_ref_batch_size=batch // 2, loss_type=["sigmoid"])
    trainer = trl_trainer_class()(model=model, args=cfg, train_dataset=trl_dataset(pairs),
                                  processing_class=AutoTokenizer.from_pretrained(model_path))
    ds = trainer.train_dataset
    shutil.rmtree(tmp, ignore_errors=True)
    return {"s": trainer.precompute_seconds, "chosen": list(ds["ref_chosen_logps"]),
            "rejected": list(ds["ref_rejected_logps"]), "peak_mib": peak_rss_mib()}


def profile_engine(model_path: Path, pairs: list[dict[str, Any]], batch: int, top: int) -> None:
    """Where the vLLM side's time goes: `workers.vllm_pool.Engine` in this process (vLLM's
    engine core in-process too, VLLM_ENABLE_V1_MULTIPROCESSING=0, so cProfile sees it):
    the constructor (engine start), then `sequence_logprobs` over the pairs in batches."""
    import cProfile
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from workers.vllm_pool import Engine

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    engine = Engine(str(model_path), DEMO_ENGINE)
    prof.disable()
    emit(line("profile: Engine() in-process", time.perf_counter() - t0, "s"))
    print_profile(prof, top, "profile (engine start)", key="cumtime")
    prompts = [p["prompt_ids"] for p in pairs]
    engine.sequence_logprobs(prompts[:8], [p["chosen_ids"] for p in pairs[:8]])  # warm-up
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for i in range(0, len(pairs), batch):
        for col in ("chosen_ids", "rejected_ids"):
            engine.sequence_logprobs(prompts[i:i + batch], [p[col] for p in pairs[i:i + batch]])
    prof.disable()
    emit(line("profile: in-process engine-only pairs/s", len(pairs) / (time.perf_counter() - t0)))
    print_profile(prof, top, "profile (sequence_logprobs)")


def gap(a: list[float], b: list[float]) -> tuple[float, float]:
    d = [abs(x - y) for x, y in zip(a, b)]
    return max(d), sum(d) / len(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--pool-batch", type=int, default=128, help="rows per actor call (demo: 128)")
    ap.add_argument("--hf-batch", type=int, default=32, help="sequences per HF forward")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="only profile the vLLM engine in-process (start, then calls)")
    ap.add_argument("--profile-top", type=int, default=15)
    args = ap.parse_args()
    set_env()
    (CACHE / "reference").mkdir(parents=True, exist_ok=True)
    model_path = build_bench_model()
    pairs = sorted(load_pairs(model_path, limit=args.pairs), key=lambda p: p["id"])
    data = write_pairs(pairs, CACHE / "reference" / f"pairs-{len(pairs)}.parquet")
    n = len(pairs)
    if args.profile:
        return profile_engine(model_path, pairs, args.pool_batch, args.profile_top)
    emit(line("machine", machine()),
         line("model", f"{model_path.name} (random weights, fp32); {n} toy pairs "
                       f"({2 * n} sequences); pool batch {args.pool_batch}, HF batch {args.hf_batch}"))
    hf = in_fresh_process(_hf_process, str(model_path), pairs, args.hf_batch)
    hf1 = in_fresh_process(_hf_process, str(model_path), pairs, args.hf_batch, 1)
    emit(line("HF loop pairs/s", n / hf["s"]),
         line("HF loop torch threads", hf["threads"]),
         line("HF loop peak RSS", hf["peak_mib"], "MiB"),
         line("HF loop pairs/s at 1 torch thread (vLLM CPU runs its model on one)",
              n / hf1["s"]))
    trl = None
    if not args.skip_trl:
        trl = in_fresh_process(_trl_process, str(model_path), pairs, args.hf_batch)
        g = gap(trl["chosen"] + trl["rejected"], hf["chosen"] + hf["rejected"])
        emit(line("TRL precompute pairs/s", n / trl["s"]),
             line("TRL precompute peak RSS", trl["peak_mib"], "MiB"),
             line("TRL - HF |log-prob gap| max / mean", f"{g[0]:.2e} / {g[1]:.2e}", "nats"))
    pool = run_pool(model_path, data, args.pool_batch)
    assert pool["ids"] == [p["id"] for p in pairs]
    g = gap(pool["chosen"] + pool["rejected"], hf["chosen"] + hf["rejected"])
    emit(line("vLLM pool (reference stage) pairs/s", n / pool["wall_s"]),
         line("vLLM pool stage wall", pool["wall_s"], "s"),
         line("vLLM engine start (Engine actor constructor)", pool["init_s"], "s"),
         line("vLLM engine-only pairs/s (engine calls, no engine start)", n / pool["engine_s"]),
         line("Ray start (not in the stage wall)", pool["ray_start_s"], "s"),
         line("vLLM - HF |log-prob gap| max / mean", f"{g[0]:.2e} / {g[1]:.2e}", "nats"))
    if trl:
        emit(ratio_line("vLLM pool / TRL precompute pairs/s ratio", trl["s"], pool["wall_s"]),
             ratio_line("vLLM engine-only / TRL precompute pairs/s ratio", trl["s"],
                        pool["engine_s"]))
    emit(ratio_line("vLLM engine-only / HF loop pairs/s ratio", hf["s"], pool["engine_s"],
                    target=3),
         ratio_line("vLLM pool (whole stage) / HF loop pairs/s ratio", hf["s"], pool["wall_s"],
                    target=3))


if __name__ == "__main__":
    main()
