"""LoRA vs full fine-tuning on our trainer, and one shared vLLM engine vs two pools.

Trainer: the real train stage (`pipeline.stages.train.run_train`: Ray Data, Ray Train,
DeepSpeed, the recipe) on the same model, pairs and layout as `bench_trainer.py`, once with
every weight trained and once with `model.lora` (peft adapters on every linear layer, the
base frozen), in the same run: trainable parameters, pairs/s after the first step, and each
Ray Train worker's peak RSS (VmHWM).

Engines: `pipeline.engines.Engines` as a LoRA run uses them, asked for the reference (the
base) and the policy (an adapter) once, with `model.lora.shared_engine` true (one pool
serves both) and false (a reference pool and a LoRA policy pool): engine actors started,
the wall time until both have answered one log-prob call, and the engine processes' peak RSS.

    .venv/bin/python bench/bench_lora.py [--steps 12] [--workers 1 2] [--rank 16]
                                          [--zero-stage 3] [--model-layers 4]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_trainer import LR, reference_parquet, run_ours
from fixtures import CACHE, build_bench_model, load_pairs, local_ray, pair_tokens, set_env
from harness import PeakMemoryWatch, emit, line, machine, ratio_line

ENGINE = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True}


def lora_section(rank: int) -> dict[str, Any]:
    return {"r": rank, "alpha": 2 * rank, "target_modules": "all-linear"}


def run_engines(model_path: Path, rank: int, shared: bool) -> dict[str, Any]:
    """Engine actors a LoRA run starts to serve its reference and its policy, and how long
    until both have answered."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import parse_config
    from pipeline.engines import Engines
    from workers import lora

    tmp = Path(tempfile.mkdtemp(prefix="lora-engines-", dir=CACHE))
    try:
        section = {**lora_section(rank), "shared_engine": shared}
        cfg = parse_config({
            "model": {"policy": str(model_path), "lora": section},
            "data": {"train": ["unused.parquet"]},
            "reference": {"engine": ENGINE, "cpus_per_actor": 0},
            "sampling": {"engine": ENGINE, "cpus_per_actor": 0}})
        model = lora.wrap(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                          cfg.model.lora.model_dump(), str(model_path))
        state = {f"lm.{k}": v for k, v in model.base_model.model.state_dict().items()}
        lora.export(state, model, "lm.", tmp / "adapter", tmp / "merged")
        prompts, responses = [[1, 2, 3, 4]] * 8, [[5, 6, 7, 8]] * 8
        with local_ray(num_cpus=4), PeakMemoryWatch("Engine") as watch:
            t0 = time.time()
            with Engines(cfg) as engines:
                ref = engines.client("reference", str(model_path))
                ref.call(0, "sequence_logprobs", prompts, responses)
                pol = engines.client("policy", str(tmp / "adapter"))
                pol.call(0, "sequence_logprobs", prompts, responses)
                actors = sum(len(p.actors) for p in engines.pools.values())
                wall = time.time() - t0
        return {"actors": actors, "wall_s": wall,
                "peak_mib": sorted(watch.peak.values(), reverse=True)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model-layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                    help="train.zero_stage of both runs (default: the config's, auto)")
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--skip-engines", action="store_true")
    args = ap.parse_args()
    args.packing = args.share_prompt = None  # the config's defaults (bench_trainer.run_ours)
    set_env()
    (CACHE / "trainer").mkdir(parents=True, exist_ok=True)
    model_path = build_bench_model(num_hidden_layers=args.model_layers)
    pairs = load_pairs(model_path)
    data = reference_parquet(model_path, pairs)
    from workers.lora import inspect

    plan = inspect(str(model_path), {**lora_section(args.rank), "dropout": 0.0,
                                     "use_rslora": False})
    emit(line("machine", machine()),
         line("model", f"{model_path.name} (random weights, fp32); {len(pairs)} toy pairs, "
                       f"{pair_tokens(pairs) / len(pairs):.1f} tokens/pair; micro-batch "
                       f"{args.micro_batch}, grad-accum {args.grad_accum}, {args.steps} steps"),
         line("trainable parameters, full fine-tuning", plan.total - plan.trainable),
         line(f"trainable parameters, LoRA r={args.rank} all-linear", plan.trainable),
         line("LoRA trainable share", f"{100 * plan.trainable / plan.total:.2f}%"))
    for w in args.workers:
        full = run_ours(model_path, data, w, args)
        adapters = run_ours(model_path, data, w, args, lora=lora_section(args.rank),
                            learning_rate=args.lora_lr)
        for name, r in (("full", full), ("LoRA", adapters)):
            emit(line(f"{w}w {name} ({r['layout']}) pairs/s", r["pairs_per_s"]),
                 line(f"{w}w {name} peak RSS per worker",
                      " / ".join(f"{m:.0f}" for m in r["peak_mib"]), "MiB"),
                 line(f"{w}w {name} loss first → last step",
                      f"{r['losses'][0]:.4f} → {r['losses'][-1]:.4f}"))
        emit(ratio_line(f"{w}w LoRA / full pairs/s", adapters["pairs_per_s"], full["pairs_per_s"]),
             ratio_line(f"{w}w LoRA / full peak RSS (largest worker)", adapters["peak_mib"][0],
                        full["peak_mib"][0]))
    if not args.skip_engines:
        for shared in (True, False):
            r = run_engines(model_path, args.rank, shared)
            name = "one shared engine" if shared else "reference pool + policy pool"
            emit(line(f"engines, {name}: actors started", r["actors"]),
                 line(f"engines, {name}: start to both answered", r["wall_s"], "s"),
                 line(f"engines, {name}: peak RSS per engine process",
                      " / ".join(f"{m:.0f}" for m in r["peak_mib"]), "MiB"))
    emit(line("learning rates", f"full {LR:g}, LoRA {args.lora_lr:g}"))


if __name__ == "__main__":
    sys.exit(main())
