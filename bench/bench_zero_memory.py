"""Scaling model: per-worker parameter + optimizer memory at ZeRO 0 / 2 / 3 for 1 and 2
workers (measured), next to the ZeRO paper's model-state formula that projects it to
8 GPUs and to several nodes.

Each configuration is a Ray Train TorchTrainer whose workers build the engine exactly as
`workers.recipe.recipe.DPORecipe.setup` does (`_load_policy` with `HfDeepSpeedConfig` under
ZeRO-3, `torch.optim.AdamW`, `deepspeed_config`, `ResponseLogps`), take one optimizer step
on 8 pairs, then count, after `gc.collect()`, the bytes of every live tensor storage in the
process (parameters / their ZeRO partitions, gradients and gradient partitions, Adam
moments, DeepSpeed's flat buffers), the local parameter bytes and the Adam state bytes.
fp32 throughout, as on CPU here. Projection (ZeRO paper, mixed-precision Adam, Psi
parameters, N data-parallel ranks): stage 0: 16 Psi; stage 1: 4 Psi + 12 Psi/N; stage 2:
2 Psi + 14 Psi/N; stage 3: 16 Psi/N bytes per rank (plus activations and buffers).

    .venv/bin/python bench/bench_zero_memory.py [--stages 0 2 3] [--workers 1 2] [--layers 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fixtures import CACHE, build_bench_model, load_pairs, local_ray, qwen2_param_count, set_env
from harness import emit, line, machine


def measure_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: build as the trainer does, one step, count live tensor bytes."""
    import gc
    import os

    import deepspeed
    import ray.train
    import torch

    from workers.logprobs import ResponseLogps
    from workers.recipe.options import TrainLoopConfig, deepspeed_config
    from workers.recipe.recipe import _load_policy
    from workers.train_step import pair_loss, rows_to_pairs

    cfg = TrainLoopConfig(**config["loop"])
    policy_path = config["policy"]
    rank = ray.train.get_context().get_world_rank()
    ds_config = deepspeed_config(cfg)
    model, _keep = _load_policy(cfg, policy_path, ds_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                  betas=tuple(cfg.adam_betas))
    engine, _, _, _ = deepspeed.initialize(model=ResponseLogps(model), optimizer=optimizer,
                                               config=ds_config, dist_init_required=False)
    pairs = rows_to_pairs(config["rows"], 0)
    loss, _ = pair_loss(engine, pairs, "sigmoid", {"beta": 0.1})
    engine.backward(loss)
    engine.step()
    del loss, pairs
    gc.collect()

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            with contextlib.suppress(RuntimeError, NotImplementedError):  # storage-less kinds
                s = obj.untyped_storage()
                seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    local_params = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p.data).numel() * 4
                       for p in model.parameters())
    adam = sum(t.numel() * t.element_size() for st in optimizer.state.values()
               for t in st.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    rss = 0.0
    for text in Path("/proc/self/status").read_text().splitlines():
        if text.startswith("VmHWM:"):
            rss = int(text.split()[1]) / 1024
    out = {"rank": rank, "all_tensors": sum(seen.values()), "largest": max(seen.values()),
           "local_params": local_params,
           "adam": adam, "peak_rss_mib": rss, "pid": os.getpid()}
    Path(config["out"], f"rank-{rank}.json").write_text(json.dumps(out))
    ray.train.report({"done": 1})


def run_config(model_path: Path, rows: dict[str, list[Any]], stage: int, workers: int,
               out: Path) -> list[dict[str, Any]]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.recipe.options import TrainLoopConfig

    loop = TrainLoopConfig(
        tokenizer_path=str(model_path), loss_name="sigmoid",
        loss_params={"beta": 0.1}, zero_stage=stage, micro_batch_size=len(rows["prompt_ids"]),
        grad_accum_steps=1, epochs=1, learning_rate=5e-5,
        lr_schedule="constant", grad_clip=1.0, weight_decay=0.0,
        adam_betas=(0.9, 0.95), seed=0, bf16=False, gradient_checkpointing=False)
    d = out / f"zero{stage}-{workers}w"
    d.mkdir(parents=True)
    cfg = loop.to_dict()
    for handle in TrainLoopConfig.HANDLES:
        cfg.pop(handle)
    trainer = TorchTrainer(
        measure_loop, train_loop_config={"loop": cfg, "policy": str(model_path), "rows": rows,
                                              "out": str(d)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                     resources_per_worker={"CPU": 2 / workers}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=d.name, storage_path=str(out / "ray_train")))
    result = trainer.fit()
    if result.error:
        raise result.error
    return [json.loads(p.read_text()) for p in sorted(d.glob("rank-*.json"))]


def projection(psi: float, stage: int, n: int) -> float:
    """Model-state bytes per rank, mixed-precision Adam (ZeRO paper, section 5)."""
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n,
            3: 16 * psi / n}[stage]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    set_env()
    model_path = build_bench_model(num_hidden_layers=args.layers)
    from transformers import AutoConfig

    psi = qwen2_param_count(AutoConfig.from_pretrained(model_path))
    pairs = load_pairs(model_path, limit=8)
    rows = {k: [list(p[k]) for p in pairs] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    rows.update(ref_chosen_logp=[0.0] * len(pairs), ref_rejected_logp=[0.0] * len(pairs))
    emit(line("machine", machine()),
         line("model", f"{model_path.name}: {psi / 1e6:.2f} M parameters, fp32 "
                       f"(params {4 * psi / 2**20:.1f} MiB, + grads + Adam m, v = "
                       f"{16 * psi / 2**20:.1f} MiB unsharded)"))
    out = Path(tempfile.mkdtemp(prefix="zero-", dir=CACHE))
    try:
        with local_ray(num_cpus=4):
            for stage in args.stages:
                for w in args.workers:
                    ranks = run_config(model_path, rows, stage, w, out)
                    mib = 2**20
                    emit(line(f"ZeRO-{stage} {w}w per worker: local params / Adam state / all "
                              "live tensors (largest one) / peak RSS",
                              " ; ".join(f"{r['local_params'] / mib:.1f} / {r['adam'] / mib:.1f} / "
                                         f"{r['all_tensors'] / mib:.1f} ({r['largest'] / mib:.1f})"
                                         f" / {r['peak_rss_mib']:.0f}" for r in ranks), "MiB"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    for name, p in (("bench model", psi), ("Qwen2.5-7B", 7.62e9)):
        for n in (8, 16, 64):
            emit(line(f"projection {name}, {n} GPUs (bf16 + fp32 Adam) per GPU: ZeRO-0/1/2/3",
                      " / ".join(f"{projection(p, s, n) / 2**30:.2f}" for s in (0, 1, 2, 3)),
                      "GiB"))


if __name__ == "__main__":
    main()
