"""train: one Ray Train TorchTrainer for the run, N workers × DeepSpeed ZeRO, loss from the registry.

The run's `TrainerSession` starts the worker group at the first round that trains; each
round's train stage orders its pairs (with reference log-probs), hands them to the group as
a job (workers.recipe) and waits for the round's consolidated HF model in out_dir/model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import RunConfig, validate_loss
from workers.lora import is_adapter


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
    from pipeline.blocks import read_parquet

    # blocks of up to ROWS_PER_SORT_BLOCK rows: the sort makes a partition per block, so
    # small data is sorted in one
    ds = read_parquet(data_dir, ROWS_PER_SORT_BLOCK)
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


def loop_config(cfg: RunConfig, env: dict[str, str], metrics_sink: Any = None, board: Any = None,
                coordinator: Any = None) -> Any:
    """The workers' TrainLoopConfig: every TrainConfig field of the same name is copied
    (one place, no hand-kept list), plus what is derived from the run."""
    from dataclasses import fields

    from workers.logprobs import head_calls
    from workers.recipe.options import TrainLoopConfig

    t = cfg.train
    same = {f.name: getattr(t, f.name) for f in fields(TrainLoopConfig) if hasattr(t, f.name)}
    return TrainLoopConfig(
        **same, tokenizer_path=cfg.model.tokenizer_path,
        loss_name=cfg.loss.name, loss_params=validate_loss(cfg.loss),
        head_calls=head_calls(max(cfg.data.max_response_tokens, cfg.sampling.max_tokens),
                              t.micro_batch_size, t.logprob_chunk_size),
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle_weights=cfg.model.allow_pickle_weights,
        lora=cfg.model.lora.model_dump() if cfg.model.lora else None, metrics_sink=metrics_sink,
        progress_board=board, coordinator=coordinator, extra_env=env)


def round_job(cfg: RunConfig, round_index: int, key: str, policy_path: str, steps: int,
              out_dir: Path, dataset: Any) -> Any:
    """One round's job for the workers (what changes from round to round)."""
    from workers.recipe.options import RoundJob

    return RoundJob(round_index=round_index, key=key, policy_path=str(policy_path),
                    optimizer_steps=steps, warmup_steps=round(cfg.train.warmup_ratio * steps),
                    out_dir=str(Path(out_dir).resolve()), dataset=dataset)


RESULT_WAIT_S = 1.0  # how long the driver's ask for a round's result waits (see train)


class TrainerSession:
    """The run's one Ray Train fit: a worker group that loads the model and builds DeepSpeed
    once and trains every round handed to it (workers.recipe).

    The fit runs in a driver thread started by the first `train` call; `close` ends it (the
    workers stop at their next poll for work) and removes its resumable state. A driver that
    dies leaves that state under storage_dir/name: the next run's fit of the same name
    restores Ray Train's latest checkpoint, which the workers resume when its round and key
    are those of the first round they are given.

    The watchdog is the driver's side of workers.watchdog for the whole fit: a thread kills
    the actors of workers whose beats stopped; a round's outcome is read against the board
    (a permanent error raises its own message once, a stall names where each worker was)."""

    NAME = "trainer"

    def __init__(self, cfg: RunConfig, storage_dir: Path, env: dict[str, str], sink: Any = None):
        self.cfg, self.storage_dir, self.env, self.sink = cfg, Path(storage_dir), env, sink
        self.thread: Any = None
        self.fit_error: BaseException | None = None

    def _start(self) -> None:
        import threading

        import ray
        from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
        from ray.train import RunConfig as RayRunConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from workers.recipe.coordinator import RoundCoordinator
        from workers.recipe.recipe import train_loop_per_worker
        from workers.watchdog import ProgressBoard, watch_board

        t = self.cfg.train
        use_gpu = t.gpus_per_worker > 0
        self.board = ray.remote(ProgressBoard).options(num_cpus=0).remote(
            "train", 0, t.stall_timeout_s)
        self.coordinator = ray.remote(RoundCoordinator).options(num_cpus=0).remote(self.sink)
        loop = loop_config(self.cfg, self.env, self.sink, self.board, self.coordinator)
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
            run_config=RayRunConfig(
                name=self.NAME, storage_path=str(self.storage_dir.resolve()),
                failure_config=FailureConfig(max_failures=t.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        self.done = threading.Event()
        self.watcher = threading.Thread(target=watch_board, name="train-watch", daemon=True,
                                        args=(self.board, self.done,
                                              max(1.0, t.stall_timeout_s / 5)))
        self.watcher.start()
        self.thread = threading.Thread(target=self._fit, args=(trainer,), name="train-fit",
                                       daemon=True)
        self.thread.start()

    def _fit(self, trainer: Any) -> None:
        try:
            self.fit_error = trainer.fit().error
        except Exception as err:  # noqa: BLE001 (TrainingFailedError and the like: train() raises it)
            self.fit_error = err

    def train(self, job: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Hand the workers one round and wait for its result: (result, stalls survived)."""
        import ray

        if self.thread is None:
            self._start()
        ray.get(self.board.set_round.remote(job.round_index), timeout=60)
        ray.get(self.coordinator.submit.remote(job.to_dict()), timeout=60)
        # each ask waits up to RESULT_WAIT_S for the result, then the fit's thread is checked
        while (result := ray.get(self.coordinator.result.remote(job.round_index, RESULT_WAIT_S),
                                 timeout=RESULT_WAIT_S + 60)) is None:
            if not self.thread.is_alive():
                self._raise_ended(job.round_index)
        summary = ray.get(self.board.summary.remote(), timeout=60)
        return result, [s for s in summary["stalls"] if s["round"] == job.round_index]

    def _raise_ended(self, round_index: int) -> None:
        """The fit ended before the round's result came: say why, as precisely as the board can."""
        import ray

        from workers.watchdog import PermanentError, TrainingStalled, stall_message

        summary = ray.get(self.board.summary.remote(), timeout=60)
        permanent = summary["permanent"]
        if permanent is not None:
            raise PermanentError(f"train stage, round {summary['round']}: {permanent['who']} at"
                                 f" step {permanent['step']}: {permanent['error']}\n"
                                 f"{permanent['traceback']}", summary["starts"]) from None
        if self.fit_error is not None and summary["stalls"]:
            raise TrainingStalled(stall_message(summary)) from self.fit_error
        if self.fit_error is not None:
            raise self.fit_error
        raise RuntimeError(f"train stage, round {round_index}: the trainer ended without"
                           " finishing the round")

    def close(self, ok: bool = True, timeout_s: float = 120.0) -> None:
        """End the fit: the workers stop at their next poll. Not `ok` (the run failed): a
        round in flight is abandoned (its workers are ended) and the resumable state kept."""
        import contextlib

        import ray

        if self.thread is None:
            return
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(self.coordinator.stop.remote(), timeout=60)
            if not ok and self.thread.is_alive() and ray.get(
                    self.coordinator.in_flight.remote(), timeout=60):  # it polls no more
                for handle in ray.get(self.board.live.remote(), timeout=60):
                    with contextlib.suppress(ray.exceptions.RayError):
                        ray.kill(handle, no_restart=False)
        self.thread.join(timeout_s)
        self.done.set()
        for actor in (self.board, self.coordinator):
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(actor)
        if ok and self.fit_error is None:  # resumable state, no longer needed
            shutil.rmtree(self.storage_dir / self.NAME, ignore_errors=True)
        self.thread = None


def run_train(data_dir: Path, policy_path: str, cfg: RunConfig, out_dir: Path,
              trainer: TrainerSession, shuffle: bool = True, round_index: int = 0,
              carry: bool = False, key: str = "train") -> dict[str, Any]:
    """Train on `data_dir` (parquet with ref columns) on the run's trainer; the workers write
    the HF model to out_dir/model (with LoRA also the adapter to out_dir/adapter). The
    result's `offered` holds the references to the same weights in Ray's object store
    (train.weight_transfer), or None.

    shuffle=False keeps a curriculum instead: pairs in decreasing reward gap (Curry-DPO).
    carry=True (sampled rounds): the pairs this round does not train on (all of them when
    they are fewer than one global batch, else the tail past the last full batch) go to
    out_dir/carry for the next round, instead of failing the round or being dropped.
    `key` names the round's inputs: a checkpoint the trainer finds (a crashed driver,
    resumed) is resumed only by a round of the same index and key.

    A worker that makes no progress for train.stall_timeout_s ends with an error naming
    where (workers.watchdog), and Ray Train's max_failures applies; an error a retry would
    repeat (a loss missing an input, bad data) fails the stage once with its message."""
    t = cfg.train
    ds = ordered_pairs(data_dir, t.seed, shuffle) if any(data_dir.glob("*.parquet")) else None
    num_pairs = ds.count() if ds is not None else 0
    if carry and num_pairs < t.global_batch_size:  # a small online round: its pairs wait
        carried = carry_over(ds, 0, round_index, out_dir / "carry") if num_pairs else 0
        kept = Path(policy_path).resolve()  # the policy is unchanged (a LoRA round's: its
        merged = {"merged_dir": str(kept.parent / "model")} if is_adapter(kept) else {}  # merge)
        return {"model_dir": str(kept), **merged, "num_pairs": num_pairs,
                "optimizer_steps": 0, "steps_done": 0, "trained_pairs": 0, "carried": carried,
                "nonfinite_skipped": 0, "stalls_survived": [], "final_metrics": {}}
    steps = optimizer_steps(num_pairs, cfg)
    if trainer.sink is not None:  # for the dashboard: stage progress and h = margin / β
        trainer.sink.plan.remote("train", steps, validate_loss(cfg.loss).get("beta"))
    # The pairs past the last full batch are known before training: they are written for the
    # next round while the workers train (a Ray Data write, off the round's critical path).
    trained = min(steps, num_pairs // t.global_batch_size) * t.global_batch_size
    with ThreadPoolExecutor(1, thread_name_prefix="carry") as pool:
        carrying = pool.submit(carry_over, ds, trained, round_index, out_dir / "carry") \
            if carry else None
        final, stalls = trainer.train(round_job(cfg, round_index, key, policy_path, steps,
                                                out_dir, ds))
        carried = carrying.result() if carrying else 0
    stopped = final.get("stopped")
    if stopped:
        trainer.storage_dir.mkdir(parents=True, exist_ok=True)
        report = trainer.storage_dir / f"{key}-round-{round_index}-nonfinite.json"
        report.write_text(json.dumps(final, indent=2, default=str))
        raise NonFiniteStop(f"training stopped: {stopped}; the offending batches' pair ids"
                            f" are in {report}")
    # with LoRA the round's policy is its adapter (what the engines and the next round
    # load), and out_dir/model the merged model
    exported = {"model_dir": "adapter", "merged_dir": "model"} if cfg.model.lora else \
        {"model_dir": "model"}
    for d in exported.values():
        if not (out_dir / d).is_dir():
            raise RuntimeError(f"training finished without writing {out_dir / d}")
    return {**exported, "num_pairs": num_pairs, "optimizer_steps": steps,
            "offered": final.get("weights"),  # the weights in the object store, or None
            "trained_pairs": trained, "carried": carried,
            "steps_done": final.get("step"), "nonfinite_skipped": final.get("nonfinite_skipped", 0),
            "stalls_survived": [{k: v for k, v in x.items() if k != "stack"} for x in stalls],
            "final_metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))}}
