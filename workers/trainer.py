"""The Ray Train worker loop: DeepSpeed init, micro-steps over the dataset shard, HF export.

Runs inside each Ray Train worker. Everything it needs arrives in one plain dict
(`TrainLoopConfig.to_dict()`), built on the driver from the validated run config.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.logprobs import ResponseLogps
from workers.nonfinite import (
    NonFiniteGuard,
    all_ranks,
    inject_nan_gradient,
    local_weights_finite,
)
from workers.packing import attention_mode
from workers.train_step import RunningMean, pair_loss, rows_to_pairs
from workers.watchdog import Watchdog, inject_stall, is_permanent

DS_TAG = "deepspeed"  # the DeepSpeed checkpoint tag inside a Ray Train checkpoint
EXPORT_MARKER = "rayalign_export.json"  # marks the final HF export among the checkpoints
STOP_MARKER = "rayalign_stopped.json"  # marks a run stopped on NaN/inf (holds the batch ids)
SETUP_TIMEOUT_FACTOR = 3  # setup phases may take this many stall timeouts (workers.watchdog)


@dataclass
class TrainLoopConfig:
    policy_path: str
    tokenizer_path: str
    loss_name: str
    loss_params: dict[str, Any]
    zero_stage: int
    micro_batch_size: int
    grad_accum_steps: int
    optimizer_steps: int  # per run (all epochs), identical on every rank
    epochs: int
    learning_rate: float
    lr_schedule: str
    warmup_steps: int
    grad_clip: float
    weight_decay: float
    adam_betas: tuple[float, float]
    seed: int
    bf16: bool
    gradient_checkpointing: bool
    optimizer: str = "adamw"  # 'adamw' | 'cpu_adam' (DeepSpeed CPU Adam + ZeRO-Offload)
    offload_params: bool = False  # ZeRO-3 parameter offload to host memory
    packing: bool = False  # pack pairs into shared rows (workers.packing)
    attention: str = "auto"  # see pipeline.config.TrainConfig.attention
    share_prompt: bool = False
    pack_row_tokens: int | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False  # else safetensors only
    logprob_chunk_size: int = 1024
    head_calls: int | None = None  # LM-head calls per forward, the same on every rank (logprobs)
    stall_timeout_s: float = 300.0  # no progress for this long ends the worker (watchdog)
    checkpoint_every: int = 0  # optimizer steps between resumable DeepSpeed checkpoints
    on_nonfinite: str = "skip"  # 'skip' | 'stop' (see workers.nonfinite)
    max_nonfinite: int = 10
    metrics_sink: Any = None  # a MetricsSink actor handle, or None
    progress_board: Any = None  # a workers.watchdog.ProgressBoard actor handle, or None
    extra_env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics_sink"], d["progress_board"] = self.metrics_sink, self.progress_board
        return d


def deepspeed_config(cfg: TrainLoopConfig, hidden_size: int | None = None) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.optimizer == "cpu_adam":  # ZeRO-Offload: optimizer states and update on the host
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload_params:  # ZeRO-3: parameter partitions live in host memory between uses
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if cfg.zero_stage >= 2 and hidden_size:
        # Buckets sized to the model (DeepSpeed's defaults hold 5e8 elements per rank
        # whatever the model), as transformers' "auto" values do.
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        if cfg.zero_stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip if cfg.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(cfg: TrainLoopConfig, params) -> torch.optim.Optimizer:
    """torch AdamW, or DeepSpeed's CPU Adam (the same update, run on the host over the
    offloaded optimizer states; `deepspeed_config` turns the offload on)."""
    kwargs = {"lr": cfg.learning_rate, "betas": tuple(cfg.adam_betas),
              "weight_decay": cfg.weight_decay, "eps": 1e-8}
    if cfg.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    return torch.optim.AdamW(params, **kwargs)


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


ATTENTION_IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "eager", "flex": "flex_attention",
                             "flash": "flash_attention_2"}


def attn_implementation(attention: str, packing: bool, cuda: bool) -> str:
    """The transformers attn_implementation for train.attention ('auto': FlexAttention where
    it pays and has a backward, i.e. packed rows on GPU; SDPA otherwise)."""
    if attention == "auto":
        return "flex_attention" if (cuda and packing) else "sdpa"
    return ATTENTION_IMPLEMENTATIONS[attention]


def _hidden_size(cfg: TrainLoopConfig) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.policy_path, trust_remote_code=cfg.trust_remote_code)
    return getattr(config, "hidden_size", None)


def _load_policy(cfg: TrainLoopConfig, ds_config: dict[str, Any]):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    keep_alive = None
    if cfg.zero_stage == 3:
        # Lets from_pretrained load straight into ZeRO-3 partitions (big models never whole).
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.policy_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=attn_implementation(cfg.attention, cfg.packing,
                                                torch.cuda.is_available()),
        use_safetensors=None if cfg.allow_pickle_weights else True)
    for module in model.modules():  # preference training disables dropout (as TRL does)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, keep_alive


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def batch_digest(ids) -> str:
    """A short digest of a global batch's pair ids, in order (to check data order on resume)."""
    return hashlib.blake2b("\n".join(str(i) for i in ids).encode(), digest_size=8).hexdigest()


def global_micro_batches(shard, rows_per_batch: int, epochs: int, start: int):
    """(cursor, epoch, rows) for each global micro-batch from number `start` on.

    Every worker reads the whole ordered dataset and keeps its slice of each global
    micro-batch, so which pairs form optimizer step k does not depend on the number of
    workers or on scheduling, and a restarted group skips exactly what was consumed."""
    cursor = 0
    for epoch in range(epochs):
        for rows in shard.iter_batches(batch_size=rows_per_batch, batch_format="numpy",
                                       drop_last=True):
            if cursor >= start:
                yield cursor, epoch, rows
            cursor += 1


def pair_tokens(rows: dict[str, Any]) -> int:
    """Tokens of the pairs as two whole sequences each (prompt counted twice), whatever the
    layout computes, so tokens/s compares across padding, packing and a shared prompt."""
    return sum(2 * len(p) + len(c) + len(r)
               for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]))


@dataclass
class LoopState:
    """What a DeepSpeed checkpoint carries besides weights, optimizer and scheduler."""

    step: int = 0          # optimizer steps done
    cursor: int = 0        # global micro-batches consumed (skipped ones included)
    skipped: int = 0       # micro-batches dropped (the guard counts; saved with the state)
    running: RunningMean = field(default_factory=RunningMean)  # bco's δ (running stats)

    def __post_init__(self) -> None:
        if isinstance(self.running, dict):  # restored from a checkpoint's client_state
            self.running = RunningMean(**self.running)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: the watchdog around `_train`, and permanent errors recorded
    on the board so that a restarted group ends at once instead of failing again."""
    import ray.train

    sink = config.pop("metrics_sink", None)
    board = config.pop("progress_board", None)
    cfg = TrainLoopConfig(**config)
    os.environ.update(cfg.extra_env)
    rank = ray.train.get_context().get_world_rank()
    if board is None:
        return _train(cfg, sink, None)
    import ray

    if ray.get(board.get_permanent.remote(), timeout=60) is not None:
        return  # an earlier attempt hit an error a retry repeats: the driver raises it
    watchdog = Watchdog(f"rank {rank}", cfg.stall_timeout_s, board)
    try:
        _train(cfg, sink, watchdog)
    except Exception as err:
        if is_permanent(err):
            ray.get(board.report_permanent.remote(f"rank {rank}", watchdog.step,
                                                  f"{type(err).__name__}: {err}",
                                                  traceback.format_exc()), timeout=60)
        raise
    finally:
        watchdog.close()


def _train(cfg: TrainLoopConfig, sink: Any, watchdog: Watchdog | None) -> None:
    import deepspeed
    import ray.train
    from transformers import AutoTokenizer

    def progress(step: int, phase: str, timeout_s: float | None = None) -> None:
        if watchdog is not None:
            watchdog.progress(step, phase, timeout_s)

    # loading the model and building DeepSpeed (a first run compiles its ops) may take
    # longer than a step: SETUP_TIMEOUT_FACTOR times the stall timeout
    setup_timeout = SETUP_TIMEOUT_FACTOR * cfg.stall_timeout_s

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)

    progress(0, "load", setup_timeout)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and _report_final(checkpoint, rank):
        return  # an earlier attempt finished (or stopped); its outcome stands
    ds_config = deepspeed_config(cfg, _hidden_size(cfg))
    model, _keep_alive = _load_policy(cfg, ds_config)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path,
                                              trust_remote_code=cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.optimizer_steps))
    progress(0, "deepspeed init", setup_timeout)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=ResponseLogps(model, cfg.logprob_chunk_size, cfg.head_calls), optimizer=optimizer,
        lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
    device = engine.device
    progress(0, "restore", setup_timeout)
    state = _restore(engine, checkpoint) if checkpoint is not None else LoopState()
    resumed_from = state.step
    guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_nonfinite, skipped=state.skipped)

    packing = attention_mode(model) if cfg.packing else None
    shard = ray.train.get_dataset_shard("train")
    mb = cfg.micro_batch_size
    micro, t_step, tokens, acc, step_ids = 0, time.perf_counter(), 0, {}, []
    progress(state.step + 1, "data")  # marks name the optimizer step being worked on
    for cursor, epoch, rows in global_micro_batches(shard, mb * world, cfg.epochs, state.cursor):
        if state.step >= cfg.optimizer_steps or guard.stop_reason:
            break
        state.cursor = cursor + 1
        inject_stall(rank, state.step + 1)
        ids = [str(i) for i in rows["id"]]
        mine = {k: v[rank * mb:(rank + 1) * mb] for k, v in rows.items()}
        pairs = rows_to_pairs(mine, pad_id, packing, share_prompt=cfg.share_prompt,
                              row_tokens=cfg.pack_row_tokens)
        pairs.batch = pairs.batch.to(device)
        progress(state.step + 1, "forward")
        loss, out = pair_loss(engine, pairs, cfg.loss_name, cfg.loss_params, state.running)
        loss = inject_nan_gradient(loss, state.step + 1, rank)  # a no-op unless a test sets it
        progress(state.step + 1, "loss check")
        if not all_ranks(bool(torch.isfinite(loss.detach())), device):
            guard.record("loss", state.step + 1, ids)
            continue  # no backward, no step: the next micro-batch takes this one's place
        progress(state.step + 1, "backward")
        engine.backward(loss)
        progress(state.step + 1, "optimizer step")
        engine.step()
        micro += 1
        step_ids += ids
        tokens += pair_tokens(mine)
        for k, v in {"loss": float(loss.detach()), **out.metrics}.items():
            acc[k] = acc.get(k, 0.0) + v / cfg.grad_accum_steps
        progress(state.step + 1, "data")
        if micro % cfg.grad_accum_steps:
            continue
        state.step += 1
        if getattr(engine.optimizer, "overflow", False):  # DeepSpeed skipped a NaN/inf update
            guard.record("gradient", state.step, step_ids)
        elapsed = time.perf_counter() - t_step
        acc.update({"tokens_per_s": tokens / elapsed,
                    "pairs_per_s": mb * cfg.grad_accum_steps / elapsed})
        progress(state.step, "metrics")
        metrics = _mean_across_ranks(acc)
        metrics["tokens_per_s"] *= world  # throughput of the whole group
        metrics["pairs_per_s"] *= world
        grad_norm = engine.get_global_grad_norm()
        metrics.update({"step": state.step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "nonfinite_skipped": guard.skipped, "resumed_from": resumed_from,
                        "batch_digest": batch_digest(step_ids)})
        if rank == 0 and sink is not None:
            sink.log.remote("train", metrics)
        if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
                and state.step < cfg.optimizer_steps and not guard.stop_reason):
            progress(state.step, "checkpoint")
            _save_checkpoint(engine, state, metrics, guard, device)
        # Per-step metrics go to the sink only: a Ray Train report is a barrier that waits for
        # the controller's poll (~2 s), so reporting every step would cap the step rate.
        acc, tokens, step_ids, t_step = {}, 0, [], time.perf_counter()
        progress(state.step + 1, "data")
    progress(state.step, "export")
    if not guard.stop_reason and not all_ranks(local_weights_finite(engine.module), device):
        guard.record("weights", state.step, [])
    if guard.stop_reason:  # a clean stop, not an error: Ray Train must not retry it
        _report_marker(STOP_MARKER, {"stopped": guard.stop_reason, "step": state.step,
                                     "nonfinite_events": guard.events}, rank, "stopped")
        return
    _export_hf(engine, tokenizer, cfg, rank, {"step": state.step,
                                              "nonfinite_skipped": guard.skipped,
                                              "running_mean": state.running.mean,
                                              "data_exhausted": state.step < cfg.optimizer_steps})


def _save_checkpoint(engine, state: LoopState, metrics: dict[str, Any], guard: NonFiniteGuard,
                     device) -> None:
    """A DeepSpeed checkpoint (each rank its own partition files, merged by Ray Train into
    one directory) that a restarted worker group resumes from. Never one with NaN weights."""
    import ray.train
    from ray.train import Checkpoint

    if not all_ranks(local_weights_finite(engine.module), device):
        guard.record("weights", state.step, [])
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        loop_state = {**asdict(state), "skipped": guard.skipped}
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"loop_state": loop_state})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-step-{state.step:07d}")


def _restore(engine, checkpoint) -> LoopState:
    with checkpoint.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag=DS_TAG)
    if client is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint in {checkpoint.path}")
    return LoopState(**client["loop_state"])


def _report_final(checkpoint, rank: int) -> bool:
    """If the latest checkpoint is a final one (the HF export, or a stop on NaN/inf),
    report it again and say so: a restarted group must not train past it."""
    import ray.train
    from ray.train import Checkpoint

    with checkpoint.as_directory() as d:
        marker = next((Path(d) / m for m in (EXPORT_MARKER, STOP_MARKER)
                       if (Path(d) / m).is_file()), None)
        if marker is None:
            return False
        metrics = json.loads(marker.read_text())
        if rank == 0:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
    return True


def _report_marker(name: str, metrics: dict[str, Any], rank: int, dir_name: str,
                   write: Callable[[Path], None] | None = None) -> None:
    """Every rank reports `metrics`; rank 0 attaches a checkpoint holding the marker file
    `name` (and what `write` puts beside it). Ray Train hands the driver the metrics of the
    latest checkpoint, not of the latest report, and a restarted group finds the marker."""
    import ray.train
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if write is not None:
            write(Path(tmp))
        (Path(tmp) / name).write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=dir_name)


def _export_hf(engine, tokenizer, cfg: TrainLoopConfig, rank: int, metrics: dict[str, Any]) -> None:
    """Gather ZeRO-3 shards into one state dict and save a HF safetensors checkpoint."""
    if cfg.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # every rank must call it
    else:
        state = engine.module.state_dict()
    prefix = "lm."

    def write(out: Path) -> None:
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        engine.module.lm.save_pretrained(out, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(out)

    _report_marker(EXPORT_MARKER, metrics, rank, "export", write)
