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


def fit_watched(trainer: Any, board: Any, stall_timeout_s: float) -> tuple[Any, list[dict]]:
    """trainer.fit() with the driver's side of the watchdog: a thread kills the actors of
    workers whose beats stopped, and the outcome is read against the board: a permanent
    error raises its own message once, a stall names where each worker was. Returns the
    result and the stalls a restarted group survived."""
    import threading

    import ray
    from ray.train import TrainingFailedError

    from workers.watchdog import PermanentError, TrainingStalled, stall_message, watch_board

    done = threading.Event()
    watcher = threading.Thread(target=watch_board, args=(board, done, max(1.0, stall_timeout_s / 5)),
                               name="train-watch", daemon=True)
    watcher.start()
    try:
        result = trainer.fit()
    except TrainingFailedError as err:  # Ray Train V2 raises it from fit()
        result, error = None, err
    else:
        error = result.error
    finally:
        done.set()
    summary = ray.get(board.summary.remote(), timeout=60)
    ray.kill(board)
    permanent = summary["permanent"]
    if permanent is not None:
        raise PermanentError(f"train stage, round {summary['round']}: {permanent['who']} at"
                             f" step {permanent['step']}: {permanent['error']}\n"
                             f"{permanent['traceback']}", summary["starts"]) from None
    if error is not None:
        if summary["stalls"]:
            raise TrainingStalled(stall_message(summary)) from error
        raise error
    return result, summary["stalls"]


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


REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp", "ref_chosen_prefix_logp",
               "ref_rejected_prefix_logp", "chosen_len", "rejected_len")


def carry_over(ds: Any, start: int, round_index: int, out: Path) -> int:
    """Write the pairs of `ds` (in training order) from index `start` on, which this round
    does not train on, to `out` for the next round's pair stage: reference columns dropped
    (the next round computes them against its reference), ids prefixed with the round."""
    n = ds.count()
    if start >= n:
        return 0
    tail = ds.split_at_indices([start])[1] if start else ds
    tail = tail.drop_columns([c for c in REF_COLUMNS if c in tail.columns()])
    tail = tail.map_batches(lambda b: b.set_column(b.schema.get_field_index("id"), "id", pa.array(
        [f"r{round_index}/{i}" for i in b["id"].to_pylist()])), batch_format="pyarrow")
    tail.write_parquet(str(out))
    return n - start


# TrainConfig fields the driver uses itself (placement, retries, how steps are counted),
# which the workers never read
DRIVER_ONLY = frozenset({"num_workers", "cpus_per_worker", "gpus_per_worker",
                         "placement_strategy", "resources", "max_failures", "global_batch_size",
                         "max_steps", "warmup_ratio", "precision"})


def loop_config(cfg: RunConfig, policy_path: str, steps: int, env: dict[str, str],
                metrics_sink: Any = None, board: Any = None) -> Any:
    """The workers' TrainLoopConfig: every TrainConfig field of the same name is copied
    (one place, no hand-kept list), plus what is derived from the run."""
    from dataclasses import fields

    from workers.logprobs import head_calls
    from workers.trainer import TrainLoopConfig

    t = cfg.train
    use_gpu = t.gpus_per_worker > 0
    same = {f.name: getattr(t, f.name) for f in fields(TrainLoopConfig) if hasattr(t, f.name)}
    return TrainLoopConfig(
        **same, policy_path=policy_path, tokenizer_path=cfg.model.tokenizer_path,
        loss_name=cfg.loss.name, loss_params=validate_loss(cfg.loss), optimizer_steps=steps,
        warmup_steps=round(t.warmup_ratio * steps),
        bf16=(t.precision == "bf16") or (t.precision == "auto" and use_gpu),
        head_calls=head_calls(max(cfg.data.max_response_tokens, cfg.sampling.max_tokens),
                              t.micro_batch_size, t.logprob_chunk_size),
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle_weights=cfg.model.allow_pickle_weights, metrics_sink=metrics_sink,
        progress_board=board, extra_env=env)


def run_train(data_dir: Path, policy_path: str, cfg: RunConfig, out_dir: Path,
              storage_dir: Path, env: dict[str, str], metrics_sink: Any = None,
              shuffle: bool = True, run_name: str = "train",
              round_index: int = 0, carry: bool = False) -> dict[str, Any]:
    """Train on `data_dir` (parquet with ref columns); write the HF model to out_dir/model.

    shuffle=False keeps a curriculum instead: pairs in decreasing reward gap (Curry-DPO).
    carry=True (sampled rounds): the pairs this round does not train on (all of them when
    they are fewer than one global batch, else the tail past the last full batch) go to
    out_dir/carry for the next round, instead of failing the round or being dropped.
    `run_name` names Ray Train's run under storage_dir: a run started again under the same
    name (a crashed driver, resumed) continues from its last checkpoint, so the name must
    change whenever the inputs do.

    A worker that makes no progress for train.stall_timeout_s ends with an error naming
    where (workers.watchdog), and Ray Train's max_failures applies; an error a retry would
    repeat (a loss missing an input, bad data) fails the stage once with its message."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.trainer import EXPORT_MARKER, train_loop_per_worker
    from workers.watchdog import ProgressBoard

    t = cfg.train
    ds = ordered_pairs(data_dir, t.seed, shuffle) if any(data_dir.glob("*.parquet")) else None
    num_pairs = ds.count() if ds is not None else 0
    if carry and num_pairs < t.global_batch_size:  # a small online round: its pairs wait
        carried = carry_over(ds, 0, round_index, out_dir / "carry") if num_pairs else 0
        return {"model_dir": str(Path(policy_path).resolve()), "num_pairs": num_pairs,
                "optimizer_steps": 0, "steps_done": 0, "trained_pairs": 0, "carried": carried,
                "nonfinite_skipped": 0, "stalls_survived": [], "final_metrics": {}}
    steps = optimizer_steps(num_pairs, cfg)
    if metrics_sink is not None:  # for the dashboard: stage progress and h = margin / β
        metrics_sink.plan.remote("train", steps, validate_loss(cfg.loss).get("beta"))
    use_gpu = t.gpus_per_worker > 0
    loop = loop_config(cfg, policy_path, steps, env, metrics_sink,
                       ray.remote(ProgressBoard).options(num_cpus=0).remote(
                           "train", round_index, t.stall_timeout_s))
    resources = {"CPU": t.cpus_per_worker, **t.resources}
    if use_gpu:
        resources["GPU"] = t.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.to_dict(),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=t.placement_strategy),
        # the process-group timeout backs the watchdog up (it fires a little later, so the
        # watchdog's report, with the stuck rank's stack, comes first)
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo",
                                 timeout_s=int(t.stall_timeout_s * 1.5) + 30),
        datasets={"train": ds},
        dataset_config=DataConfig(datasets_to_split=[]),  # see workers.trainer.global_micro_batches
        run_config=RayRunConfig(
            name=run_name, storage_path=str(storage_dir.resolve()),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result, stalls = fit_watched(trainer, loop.progress_board, t.stall_timeout_s)
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
    trained = min(steps, num_pairs // t.global_batch_size) * t.global_batch_size
    carried = carry_over(ds, trained, round_index, out_dir / "carry") if carry else 0
    return {"model_dir": "model", "num_pairs": num_pairs, "optimizer_steps": steps,
            "trained_pairs": trained, "carried": carried,
            "steps_done": final.get("step"), "nonfinite_skipped": final.get("nonfinite_skipped", 0),
            "stalls_survived": [{k: v for k, v in x.items() if k != "stack"} for x in stalls],
            "final_metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))}}
