"""train: Ray Train TorchTrainer, N workers × DeepSpeed ZeRO, loss from the registry.

Each worker reads its shard of the pairs (with reference log-probs) through
`ray.train.get_dataset_shard`, and the run ends with a consolidated HF checkpoint.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import RunConfig, validate_loss


def order_key(batch: pa.Table, seed: int, shuffle: bool) -> pa.Array:
    """Sort key of each pair: a seeded hash of its id (a shuffle that is the same on every
    run, which Ray Data's random_shuffle is not), or minus its reward gap (Curry-DPO)."""
    if not shuffle:
        return pc.negate(pc.subtract(batch["chosen_score"], batch["rejected_score"]))
    ids = batch["id"].to_pylist()
    return pa.array([int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(),
                                    "big") / 2.0**64 for i in ids], pa.float64())


def optimizer_steps(num_pairs: int, cfg: RunConfig) -> int:
    per_epoch = num_pairs // cfg.train.global_batch_size
    if per_epoch == 0:
        raise ValueError(f"{num_pairs} training pairs are fewer than one global batch"
                         f" (train.global_batch_size={cfg.train.global_batch_size})")
    total = per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def run_train(data_dir: Path, policy_path: str, cfg: RunConfig, out_dir: Path,
              storage_dir: Path, env: dict[str, str], metrics_sink: Any = None,
              shuffle: bool = True) -> dict[str, Any]:
    """Train on `data_dir` (parquet with ref columns); write the HF model to out_dir/model.

    shuffle=False keeps a curriculum instead: pairs in decreasing reward gap (Curry-DPO)."""
    import ray
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.trainer import TrainLoopConfig, train_loop_per_worker

    t = cfg.train
    ds = ray.data.read_parquet(str(data_dir))
    ds = ds.add_column("order_key", lambda b: order_key(b, t.seed, shuffle), batch_format="pyarrow")
    ds = ds.sort("order_key").drop_columns(["order_key"])
    num_pairs = ds.count()
    steps = optimizer_steps(num_pairs, cfg)
    if metrics_sink is not None:  # for the dashboard: stage progress and h = margin / β
        metrics_sink.plan.remote("train", steps, validate_loss(cfg.loss).get("beta"))
    use_gpu = t.gpus_per_worker > 0
    loop = TrainLoopConfig(
        policy_path=policy_path, tokenizer_path=cfg.model.tokenizer_path,
        loss_name=cfg.loss.name, loss_params=validate_loss(cfg.loss),
        zero_stage=t.zero_stage, micro_batch_size=t.micro_batch_size,
        grad_accum_steps=t.grad_accum_steps, optimizer_steps=steps, epochs=t.epochs,
        learning_rate=t.learning_rate, lr_schedule=t.lr_schedule,
        warmup_steps=int(round(t.warmup_ratio * steps)), grad_clip=t.grad_clip,
        weight_decay=t.weight_decay, adam_betas=t.adam_betas, seed=t.seed,
        bf16=(t.precision == "bf16") or (t.precision == "auto" and use_gpu),
        gradient_checkpointing=t.gradient_checkpointing, packing=t.packing,
        trust_remote_code=cfg.model.trust_remote_code, metrics_sink=metrics_sink, extra_env=env)
    resources = {"CPU": t.cpus_per_worker, **t.resources}
    if use_gpu:
        resources["GPU"] = t.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.to_dict(),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=t.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets={"train": ds},
        run_config=RayRunConfig(name="train", storage_path=str(storage_dir.resolve())),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = out_dir / "model"
    result.checkpoint.to_directory(str(model_dir))
    for leftover in ("checkpoint_", ".metadata"):  # Ray's bookkeeping, not part of the model
        for p in model_dir.glob(leftover + "*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return {"model_dir": "model", "num_pairs": num_pairs, "optimizer_steps": steps,
            "final_metrics": {k: v for k, v in (result.metrics or {}).items()
                              if isinstance(v, (int, float))}}
