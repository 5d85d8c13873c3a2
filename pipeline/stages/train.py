"""train: Ray Train TorchTrainer, N workers × DeepSpeed ZeRO, loss from the registry.

Each worker reads its shard of the pairs (with reference log-probs) through
`ray.train.get_dataset_shard`, and the run ends with a consolidated HF checkpoint.
"""

from __future__ import annotations

import hashlib
import json
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


ROWS_PER_SORT_BLOCK = 100_000


class NonFiniteStop(RuntimeError):
    """Training stopped on a NaN/inf (train.on_nonfinite); the offending ids are saved."""


def ordered_pairs(data_dir: Path, seed: int, shuffle: bool):
    """The training pairs in training order, materialised (every worker reads it whole)."""
    import ray

    ds = ray.data.read_parquet(str(data_dir))
    # a known block count keeps the sort from fanning out to 200 partitions on small data
    ds = ds.repartition(max(1, -(-ds.count() // ROWS_PER_SORT_BLOCK)))
    ds = ds.add_column("order_key", lambda b: order_key(b, seed, shuffle), batch_format="pyarrow")
    return ds.sort("order_key").drop_columns(["order_key"]).materialize()


def run_train(data_dir: Path, policy_path: str, cfg: RunConfig, out_dir: Path,
              storage_dir: Path, env: dict[str, str], metrics_sink: Any = None,
              shuffle: bool = True, run_name: str = "train") -> dict[str, Any]:
    """Train on `data_dir` (parquet with ref columns); write the HF model to out_dir/model.

    shuffle=False keeps a curriculum instead: pairs in decreasing reward gap (Curry-DPO).
    `run_name` names Ray Train's run under storage_dir: a run started again under the same
    name (a crashed driver, resumed) continues from its last checkpoint, so the name must
    change whenever the inputs do."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.trainer import EXPORT_MARKER, TrainLoopConfig, train_loop_per_worker

    t = cfg.train
    ds = ordered_pairs(data_dir, t.seed, shuffle)
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
        warmup_steps=round(t.warmup_ratio * steps), grad_clip=t.grad_clip,
        weight_decay=t.weight_decay, adam_betas=t.adam_betas, seed=t.seed,
        bf16=(t.precision == "bf16") or (t.precision == "auto" and use_gpu),
        gradient_checkpointing=t.gradient_checkpointing, packing=t.packing,
        optimizer=t.optimizer,
        offload_params=t.offload_params,
        attention=t.attention, share_prompt=t.share_prompt, pack_row_tokens=t.pack_row_tokens,
        logprob_chunk_size=t.logprob_chunk_size,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle_weights=cfg.model.allow_pickle_weights, metrics_sink=metrics_sink, extra_env=env,
        checkpoint_every=t.checkpoint_every, on_nonfinite=t.on_nonfinite,
        max_nonfinite=t.max_nonfinite)
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
        dataset_config=DataConfig(datasets_to_split=[]),  # see workers.trainer.global_micro_batches
        run_config=RayRunConfig(
            name=run_name, storage_path=str(storage_dir.resolve()),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    stopped = (result.metrics or {}).get("stopped")
    if stopped:
        report = storage_dir / f"{run_name}-nonfinite.json"
        report.write_text(json.dumps(result.metrics, indent=2, default=str))
        raise NonFiniteStop(f"training stopped: {stopped}; the offending batches' pair ids"
                            f" are in {report}")
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = out_dir / "model"
    result.checkpoint.to_directory(str(model_dir))
    for leftover in ("checkpoint_", ".metadata", EXPORT_MARKER):  # bookkeeping, not the model
        for p in model_dir.glob(leftover + "*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(storage_dir / run_name, ignore_errors=True)  # resumable state, no longer needed
    final = result.metrics or {}
    return {"model_dir": "model", "num_pairs": num_pairs, "optimizer_steps": steps,
            "steps_done": final.get("step"), "nonfinite_skipped": final.get("nonfinite_skipped", 0),
            "final_metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))}}
