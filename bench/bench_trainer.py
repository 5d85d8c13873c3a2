"""Trainer throughput: our train stage (Ray Train x DeepSpeed, 1 then 2 workers, in the
layout a user gets by default: ZeRO stage auto, packed rows, shared prompt) vs TRL's
DPOTrainer, same model, pairs, lengths, micro-batch, gradient accumulation, fp32, fused
AdamW (each side's default: ours `train.optimizer: adamw`, TRL's `adamw_torch_fused`).
TRL runs before and after ours (a shared machine drifts); ratios use its faster run.

Our side is the real stage function `pipeline.stages.train.run_train` (Ray Data read and
seeded order, TorchTrainer, `workers.recipe.recipe.train_loop_per_worker`, ZeRO-3 export) on a
local Ray cluster; TRL's side is `trl.DPOTrainer` in a fresh process, fed the same
token ids (its own text tokenisation skipped). Reference log-probs are precomputed on both
sides (ours: a parquet column, as the reference stage writes it; TRL:
`precompute_ref_log_probs=True`, computed in its constructor) and are not timed.

Throughput is wall clock between the end of the first optimizer step and the end of the
last one (the first step is warm-up), on both sides; tokens/s is pairs/s times the mean
tokens of a pair (2 x prompt + chosen + rejected, no padding) of the data set. Peak memory
is each process's peak RSS: ru_maxrss of the TRL process, VmHWM of each Ray Train worker.
Loss: DPO (`sigmoid`, beta 0.1) on both sides.

    .venv/bin/python bench/bench_trainer.py [--steps 12] [--micro-batch 8] [--grad-accum 2]
                                             [--workers 1 2] [--model-layers 4]
                                             [--zero-stage N] [--[no-]packing] [--[no-]share-prompt]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fixtures import (
    CACHE,
    build_bench_model,
    hf_response_logps,
    load_hf,
    load_pairs,
    local_ray,
    pair_tokens,
    set_env,
    trl_config,
    trl_dataset,
    trl_trainer_class,
    write_pairs,
)
from harness import (
    PeakMemoryWatch,
    StepRecorder,
    emit,
    in_fresh_process,
    line,
    machine,
    peak_rss_mib,
    print_profile,
    ratio_line,
    steady_rate,
)

LR, BETAS, CLIP, WARMUP, BETA = 5e-5, (0.9, 0.95), 1.0, 0.1, 0.1


def reference_parquet(model_path: Path, pairs: list[dict[str, Any]]) -> Path:
    """A directory with the pairs and their ref_*_logp columns, as the reference stage writes
    it (computed here by a float32 HF forward: the training benchmark does not time it)."""
    path = CACHE / "trainer" / f"{model_path.name}-{len(pairs)}-pairs_with_ref" / "pairs.parquet"
    if path.exists():
        return path.parent
    model = load_hf(model_path)
    prompts = [p["prompt_ids"] for p in pairs]
    chosen = hf_response_logps(model, prompts, [p["chosen_ids"] for p in pairs])
    rejected = hf_response_logps(model, prompts, [p["rejected_ids"] for p in pairs])
    return write_pairs(pairs, path, ref_chosen_logp=chosen, ref_rejected_logp=rejected).parent


def run_ours(model_path: Path, data: Path, workers: int, args: argparse.Namespace,
             lora: dict[str, Any] | None = None, learning_rate: float = LR) -> dict[str, Any]:
    """Our train stage on `data` (with `lora`, the model.lora section: adapters only)."""
    import ray

    from pipeline.cluster import worker_env
    from pipeline.config import parse_config
    from pipeline.stages.train import TrainerSession, run_train

    # What the bench does not set (ZeRO stage, packing, shared prompt) is TrainConfig's
    # default: the configuration a user gets.
    chosen = {k: v for k, v in (("zero_stage", args.zero_stage), ("packing", args.packing),
                                ("share_prompt", args.share_prompt)) if v is not None}
    cfg = parse_config({
        "model": {"policy": str(model_path), **({"lora": lora} if lora else {})},
        "data": {"train": [str(data)], "max_prompt_tokens": 64, "max_response_tokens": 64},
        "loss": {"name": "sigmoid", "params": {"beta": BETA}},
        "train": {"num_workers": workers, "cpus_per_worker": 2 / workers, **chosen,
                  "micro_batch_size": args.micro_batch,
                  "global_batch_size": args.micro_batch * workers * args.grad_accum,
                  "learning_rate": learning_rate, "adam_betas": list(BETAS), "grad_clip": CLIP,
                  "warmup_ratio": WARMUP, "lr_schedule": "cosine", "max_steps": args.steps,
                  "precision": "fp32", "seed": 0},
    })
    out = Path(tempfile.mkdtemp(prefix=f"ours{workers}-", dir=CACHE / "trainer"))
    try:
        with local_ray(num_cpus=4) as ray_start:
            recorder = ray.remote(StepRecorder).options(num_cpus=0).remote()
            with PeakMemoryWatch("RayTrainWorker") as watch:
                t0 = time.time()
                trainer = TrainerSession(cfg, out / "ray_train", worker_env(cfg), recorder)
                try:
                    run_train(data, str(model_path), cfg, out, trainer)
                finally:
                    trainer.close()
                wall = time.time() - t0
            recorded = ray.get(recorder.get.remote())
            rows = sorted((r for r in recorded if r[1] == "train"), key=lambda r: r[2]["step"])
            starts = [r[2] for r in recorded
                      if r[1] == "lifecycle" and r[2].get("event") == "trainer_start"]
            stages = {r["zero_stage"] for r in starts}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    times = [r[0] for r in rows]
    per_step = cfg.train.global_batch_size
    reported = sorted(r[2]["pairs_per_s"] for r in rows[1:])
    return {"pairs_per_s": steady_rate(times, per_step), "steps": len(rows),
            "reported_pairs_per_s": reported[len(reported) // 2] if reported else float("nan"),
            "first_step_s": times[0] - t0 if times else float("nan"), "wall_s": wall,
            "ray_start_s": ray_start, "peak_mib": sorted(watch.peak.values(), reverse=True),
            "pairs_per_step": per_step, "layout": layout(cfg.train, stages),
            "threads": starts[0]["torch_threads"] if starts else None,
            "losses": [r[2]["loss"] for r in rows]}


def layout(t: Any, stages: set[int]) -> str:
    """How our side trained: the ZeRO stage the workers ran (as decided for 'auto') and the
    exact token-saving paths that were on."""
    zero = "/".join(map(str, sorted(stages))) or "?"
    zero = f"ZeRO-{zero}" + (" (auto)" if t.zero_stage == "auto" else "")
    return " ".join([zero] + (["packed"] if t.packing else [])
                    + (["shared-prompt"] if t.share_prompt else []))


def _trl_process(model_path: str, pairs: list[dict[str, Any]], args: argparse.Namespace
                 ) -> dict[str, Any]:
    set_env()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *a: Any, **kw: Any) -> None:
            times.append(time.time())

    tmp = tempfile.mkdtemp(prefix="trl-", dir=CACHE / "trainer")
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    cfg = trl_config(Path(tmp), per_device_train_batch_size=args.micro_batch,
                     gradient_accumulation_steps=args.grad_accum, max_steps=args.steps,
                     learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                     max_grad_norm=CLIP, warmup_steps=round(WARMUP * args.steps),
                     beta=BETA, loss_type=["sigmoid"], max_length=128,
                     precompute_ref_batch_size=32)
    trainer = trl_trainer_class()(model=model, args=cfg, train_dataset=trl_dataset(pairs),
                                  processing_class=tokenizer, callbacks=[StepTimes()])
    t1 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training summary dict
        trainer.train()
    shutil.rmtree(tmp, ignore_errors=True)
    return {"times": times, "init_s": t1 - t0, "precompute_s": trainer.precompute_seconds,
             "first_step_s": times[0] - t1, "peak_mib": peak_rss_mib(),
             "threads": torch.get_num_threads()}


def run_trl(model_path: Path, pairs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    res = in_fresh_process(_trl_process, str(model_path), pairs, args)
    per_step = args.micro_batch * args.grad_accum
    return {**res, "pairs_per_s": steady_rate(res["times"], per_step), "steps": len(res["times"]),
            "pairs_per_step": per_step}


def profile_step(model_path: Path, data: Path, args: argparse.Namespace) -> None:
    """Where a training step's time goes, without Ray: the same step
    (`workers.train_step.pair_loss` + backward + AdamW) bare, padded and in the default
    layout (packed rows, shared prompt), then under a one-process DeepSpeed engine built as
    `workers.recipe` builds it, at ZeRO-0 and ZeRO-3; then the top functions of the last
    DeepSpeed arm by own time (cProfile)."""
    import cProfile
    import os

    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist

    from workers.logprobs import ResponseLogps
    from workers.packing import attention_mode
    from workers.recipe.options import TrainLoopConfig, deepspeed_config
    from workers.recipe.recipe import _load_policy, build_engine, step_engine
    from workers.train_step import pair_loss, rows_to_pairs

    rows = pq.read_table(data).to_pydict()
    mb, accum, steps = args.micro_batch, args.grad_accum, args.steps

    def batches(packing: Any):
        for i in range(steps * accum):
            s = (i * mb) % (len(rows["id"]) - mb)
            yield rows_to_pairs({k: v[s:s + mb] for k, v in rows.items()}, 0, packing,
                                share_prompt=packing is not None)

    def bare(packed: bool) -> float:
        model = load_hf(model_path).train()
        module = ResponseLogps(model)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, fused=True)
        times = []
        for i, pairs in enumerate(batches(attention_mode(model) if packed else None)):
            loss, _ = pair_loss(module, pairs, "sigmoid", {"beta": BETA})
            (loss / accum).backward()
            if (i + 1) % accum == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.time())
        return steady_rate(times, mb * accum)

    def under_deepspeed(stage: int, profiler: cProfile.Profile | None = None) -> float:
        cfg = TrainLoopConfig(
            tokenizer_path=str(model_path), loss_name="sigmoid",
            loss_params={"beta": BETA}, zero_stage=stage, micro_batch_size=mb,
            grad_accum_steps=accum, epochs=1, learning_rate=LR,
            lr_schedule="constant", grad_clip=CLIP, weight_decay=0.0,
            adam_betas=BETAS, seed=0, bf16=False, gradient_checkpointing=False)
        ds_config = deepspeed_config(cfg)
        model, _keep = _load_policy(cfg, str(model_path), ds_config)
        engine = build_engine(cfg, model, ds_config, world=1)
        times = []
        for i, pairs in enumerate(batches(attention_mode(model))):
            if i == accum and profiler is not None:
                profiler.enable()  # after the warm-up step
            loss, _ = pair_loss(engine, pairs, "sigmoid", {"beta": BETA})
            engine.backward(loss)
            step_engine(engine, cfg)
            if (i + 1) % accum == 0:
                times.append(time.time())
        if profiler is not None:
            profiler.disable()
        return steady_rate(times, mb * accum)

    # one process group for both DeepSpeed arms (DeepSpeed keeps the groups it was given)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    prof = cProfile.Profile()
    emit(line("profile: bare train step, padded (no DeepSpeed, no Ray) pairs/s", bare(False)),
         line("profile: bare train step, packed shared-prompt pairs/s", bare(True)),
         line("profile: packed shared-prompt under DeepSpeed ZeRO-0, 1 process pairs/s",
              under_deepspeed(0)),
         line("profile: packed shared-prompt under DeepSpeed ZeRO-3, 1 process pairs/s",
              under_deepspeed(3, prof)))
    dist.destroy_process_group()
    print_profile(prof, args.profile_top, "profile (ZeRO-3 arm)", key=args.profile_key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per side")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model-layers", type=int, default=4)
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3],
                    help="our side's train.zero_stage (default: the config's default)")
    ap.add_argument("--packing", action=argparse.BooleanOptionalAction,
                    help="our side's train.packing (default: the config's default)")
    ap.add_argument("--share-prompt", action=argparse.BooleanOptionalAction,
                    help="our side's train.share_prompt (default: the config's default)")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--health-check-interval", type=float,
                    help="set RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray default 2 s): how often"
                         " Ray Train's controller takes reports, which paces report() calls")
    ap.add_argument("--profile", action="store_true",
                    help="only profile one training step without Ray (bare, ZeRO-0, ZeRO-3)")
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--profile-key", choices=["tottime", "cumtime"], default="tottime")
    args = ap.parse_args()
    set_env()
    if args.health_check_interval is not None:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.health_check_interval)
    (CACHE / "trainer").mkdir(parents=True, exist_ok=True)
    model_path = build_bench_model(num_hidden_layers=args.model_layers)
    pairs = load_pairs(model_path)
    tokens_per_pair = pair_tokens(pairs) / len(pairs)
    data = reference_parquet(model_path, pairs)
    if args.profile:
        return profile_step(model_path, data, args)
    emit(line("machine", machine()),
         line("model", f"{model_path.name} (random weights, fp32); {len(pairs)} toy pairs, "
                       f"{tokens_per_pair:.1f} tokens/pair; micro-batch {args.micro_batch}, "
                       f"grad-accum {args.grad_accum}, {args.steps} optimizer steps a side"))
    trl = None if args.skip_trl else run_trl(model_path, pairs, args)
    if trl:
        emit(line("TRL DPOTrainer pairs/s (run 1, before ours)", trl["pairs_per_s"]),
             line("TRL DPOTrainer tokens/s", trl["pairs_per_s"] * tokens_per_pair),
             line("TRL peak RSS per process", trl["peak_mib"], "MiB"),
             line("TRL torch threads", trl["threads"]),
             line("TRL model load + constructor (incl. ref precompute)", trl["init_s"], "s"),
             line("TRL ref precompute", trl["precompute_s"], "s"),
             line("TRL train() start to end of first step", trl["first_step_s"], "s"))
    ours = {}
    for w in args.workers:
        r = ours[w] = run_ours(model_path, data, w, args)
        z = r["layout"]
        emit(line(f"ours {w}w {z} pairs/s", r["pairs_per_s"]),
             line(f"ours {w}w {z} tokens/s", r["pairs_per_s"] * tokens_per_pair),
             line(f"ours {w}w pairs/s as the trainer reports it (median step)",
                  r["reported_pairs_per_s"]),
             line(f"ours {w}w peak RSS per worker process",
                  " / ".join(f"{m:.0f}" for m in r["peak_mib"]), "MiB"),
             line(f"ours {w}w torch threads per worker", r["threads"]),
             line(f"ours {w}w Ray start", r["ray_start_s"], "s"),
             line(f"ours {w}w run_train start to end of first step", r["first_step_s"], "s"),
             line(f"ours {w}w run_train wall (incl. export)", r["wall_s"], "s"))
    if trl:
        # A shared machine's speed drifts: TRL runs again after ours, and the ratio is taken
        # against the faster of its two runs.
        again = run_trl(model_path, pairs, args)
        best = max(trl["pairs_per_s"], again["pairs_per_s"])
        emit(line("TRL DPOTrainer pairs/s (run 2, after ours)", again["pairs_per_s"]),
             line("TRL DPOTrainer pairs/s (the faster run, used below)", best))
        for w, r in ours.items():
            emit(ratio_line(f"ours {w}w / TRL pairs/s ratio", r["pairs_per_s"], best,
                            target=1.5))


if __name__ == "__main__":
    sys.exit(main())
