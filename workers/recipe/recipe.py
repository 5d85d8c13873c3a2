"""The Ray Train worker side of the run's one trainer: a recipe that reads like the algorithm.

Each worker enters `train_loop_per_worker` once per worker-group start: it waits for the
next round the driver hands out (workers.recipe.coordinator), builds the model and DeepSpeed
on the first one, then for every round: `begin_round` (a fresh optimizer state and LR
schedule from the weights it holds, or the state of this round's checkpoint), `train_round`
(micro-steps over the round's pairs, `save` every train.checkpoint_every steps), `export`
(the consolidated HF model to the round's out_dir/model; with LoRA the merged model there
and the adapter in out_dir/adapter, workers.lora), and rank 0 reports the result.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import os
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from workers import lora, weight_sync
from workers.logprobs import ResponseLogps
from workers.nonfinite import (
    NonFiniteGuard,
    all_ranks,
    inject_nan_gradient,
    local_weights_finite,
)
from workers.packing import attention_mode
from workers.recipe import checkpoint
from workers.recipe.checkpoint import LoopState
from workers.recipe.coordinator import STOP
from workers.recipe.options import (
    RoundJob,
    TrainLoopConfig,
    attn_implementation,
    auto_zero_stage,
    build_optimizer,
    deepspeed_config,
    lr_lambda,
    trainer_clips,
)
from workers.train_step import pair_loss, rows_to_pairs
from workers.watchdog import Watchdog, inject_stall, is_permanent

SETUP_TIMEOUT_FACTOR = 3  # setup phases may take this many stall timeouts (workers.watchdog)
WAIT_S = 10.0  # how long an idle worker's ask for the next round waits for one (then asks again)


def _hidden_size(cfg: TrainLoopConfig, policy_path: str) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(policy_path, trust_remote_code=cfg.trust_remote_code)
    return getattr(config, "hidden_size", None)


def parameter_count(policy_path: str) -> int:
    """The policy's parameters, from its safetensors headers (nothing loaded); without
    safetensors files, a bound from the weight files' size (>= 2 bytes a parameter)."""
    from math import prod

    from safetensors import safe_open

    files = sorted(Path(policy_path).glob("*.safetensors"))
    if not files:
        return sum(f.stat().st_size for f in Path(policy_path).glob("*.bin")) // 2
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as handle:
            total += sum(prod(handle.get_slice(k).get_shape()) for k in handle.keys())  # noqa: SIM118 (not a dict)
    return total


def worker_memory_bytes() -> int:
    """This worker's device memory: its GPU's, or its share of the host's memory (the
    cgroup limit where there is one) among the node's training workers."""
    import ray.train
    import ray.train.torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(ray.train.torch.get_device()).total_memory
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        host = min(host, int(Path("/sys/fs/cgroup/memory.max").read_text().strip()))
    return host // max(1, ray.train.get_context().get_local_world_size())


def resolve_zero_stage(cfg: TrainLoopConfig, policy_path: str) -> TrainLoopConfig:
    """The loop options with train.zero_stage 'auto' decided (auto_zero_stage), on the
    smallest worker's memory so that every rank decides the same. `policy_path` is the
    base model (with LoRA, its trainable parameters are counted on the meta device)."""
    if cfg.zero_stage != "auto":
        return cfg
    plan = lora.inspect(policy_path, cfg.lora, cfg.trust_remote_code) if cfg.lora else None
    import ray.train.torch
    import torch.distributed as dist

    memory = torch.tensor([worker_memory_bytes()], dtype=torch.int64,
                          device=ray.train.torch.get_device())
    if dist.is_initialized():
        dist.all_reduce(memory, op=dist.ReduceOp.MIN)
    parameters = plan.total if plan else parameter_count(policy_path)  # base + adapters
    return replace(cfg, zero_stage=auto_zero_stage(cfg, parameters, int(memory.item()),
                                                   plan.trainable if plan else None))


def _load_policy(cfg: TrainLoopConfig, policy_path: str, ds_config: dict[str, Any]):
    """The policy at `policy_path` (a HF model, or with LoRA a base, fresh adapters added,
    or an exported adapter on its base) and the ZeRO-3 config object from_pretrained reads."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    keep_alive = None
    if cfg.zero_stage == 3:
        # Lets from_pretrained load straight into ZeRO-3 partitions (big models never whole).
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(
        lora.base_of(policy_path), dtype=dtype, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=attn_implementation(cfg.attention, cfg.packing,
                                                torch.cuda.is_available()),
        use_safetensors=None if cfg.allow_pickle_weights else True)
    for module in model.modules():  # preference training disables dropout (as TRL does)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora:  # the adapters' own dropout (model.lora.dropout) is added after
        if cfg.gradient_checkpointing:  # checkpointed blocks of a frozen base need an input grad
            model.enable_input_require_grads()
        model = (lora.load(model, policy_path) if lora.is_adapter(policy_path)
                 else lora.wrap(model, cfg.lora, policy_path))
    return model, keep_alive


def build_engine(cfg: TrainLoopConfig, model: torch.nn.Module, ds_config: dict[str, Any],
                 world: int):
    """The DeepSpeed engine that trains `model` (response log-probs, the config's optimizer
    over its trainable parameters) on `world` data-parallel ranks."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=ResponseLogps(model, cfg.logprob_chunk_size, cfg.head_calls),
        optimizer=build_optimizer(cfg, lora.trainable_parameters(model)), config=ds_config,
        dist_init_required=False)
    if world == 1 and cfg.zero_stage == 0:
        # one process has nothing to all-reduce: DeepSpeed would still copy every gradient
        # into a flat buffer and back at each accumulation boundary (~7% of a CPU step)
        engine.enable_backward_allreduce = False
    return engine


def step_engine(engine, cfg: TrainLoopConfig) -> float | None:
    """engine.step(), and at an accumulation boundary the gradient norm (None otherwise).
    DeepSpeed's ZeRO-1..3 and 16-bit optimizers clip by that norm and keep it; at ZeRO-0 in
    fp32 the gradients (all-reduced by backward at the boundary: the same on every rank) are
    clipped here by train.grad_clip, in the one foreach pass that takes the norm
    (options.trainer_clips: DeepSpeed does not clip there)."""
    own = None
    if engine.is_gradient_accumulation_boundary() and trainer_clips(cfg):
        grads = [p for p in engine.module.parameters() if p.grad is not None]
        if grads and cfg.grad_clip > 0:
            own = float(torch.nn.utils.clip_grad_norm_(grads, cfg.grad_clip, foreach=True))
        elif grads:
            own = float(torch.nn.utils.get_total_norm([p.grad for p in grads], foreach=True))
    engine.step()
    kept = engine.get_global_grad_norm()
    return float(kept) if kept is not None else own


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


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO / bf16 wrapper (the one the schedule drives)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


class DPORecipe:
    """One worker's trainer for the whole run: setup once, then a round at a time."""

    def __init__(self, cfg: TrainLoopConfig, sink: Any, watchdog: Watchdog | None):
        import ray.train

        ctx = ray.train.get_context()
        self.cfg, self.sink, self.watchdog = cfg, sink, watchdog
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.engine: Any = None
        self.peft: Any = None  # with LoRA, peft's wrapper of the policy (see setup)
        # loading the model and building DeepSpeed (a first run compiles its ops) may take
        # longer than a step: SETUP_TIMEOUT_FACTOR times the stall timeout
        self.setup_timeout = SETUP_TIMEOUT_FACTOR * cfg.stall_timeout_s

    def progress(self, step: int, phase: str, timeout_s: float | None = None) -> None:
        if self.watchdog is not None:
            self.watchdog.progress(step, phase, timeout_s)

    # --- setup: model, tokenizer, optimizer, DeepSpeed (once per worker-group start) -----

    def setup(self, policy_path: str) -> None:
        from transformers import AutoTokenizer

        self.progress(0, "load", self.setup_timeout)
        base = lora.base_of(policy_path)
        cfg = self.cfg = resolve_zero_stage(self.cfg, base)
        torch.manual_seed(cfg.seed)
        ds_config = deepspeed_config(cfg, _hidden_size(cfg, base))
        model, self._keep_alive = _load_policy(cfg, policy_path, ds_config)
        # with LoRA, `model` is peft's wrapper: export reads it, DeepSpeed trains the model
        # peft injected its layers into (the same parameters, the same forward)
        self.peft = model if cfg.lora else None
        model = model.base_model.model if cfg.lora else model
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path,
                                                       trust_remote_code=cfg.trust_remote_code)
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else self.tokenizer.eos_token_id)
        self.packing = attention_mode(model) if cfg.packing else None
        self.progress(0, "deepspeed init", self.setup_timeout)
        self.engine = build_engine(cfg, model, ds_config, self.world)

    # --- a round -------------------------------------------------------------------------

    def begin_round(self, job: RoundJob, ckpt: Any) -> LoopState:
        """A fresh optimizer state and LR schedule from the weights the engine holds (the
        previous round's), as a fit of this round alone would start; or, when `ckpt` is this
        round's checkpoint, the state it saved."""
        cfg, engine = self.cfg, self.engine
        torch.manual_seed(cfg.seed)
        base = _base_optimizer(engine)
        base.state.clear()  # Adam moments and step count: rebuilt lazily at the first step
        if cfg.bf16 and cfg.zero_stage == 3:
            # the fp32 master weights start from the 16-bit weights, as they do after a load
            # of the exported model (so a restarted group and a running one agree)
            zero = engine.optimizer
            for low, master in zip(zero.fp16_partitioned_groups_flat,
                                   zero.fp32_partitioned_groups_flat):
                if low is not None and master is not low and master.numel():
                    master.data.copy_(low.data.to(master.dtype))
        engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            base, lr_lambda(cfg.lr_schedule, job.warmup_steps, job.optimizer_steps))
        if ckpt is None:
            return LoopState()
        self.progress(0, "restore", self.setup_timeout)
        return checkpoint.restore(engine, ckpt)

    def train_round(self, job: RoundJob, state: LoopState) -> dict[str, Any]:
        """Micro-steps over the round's pairs until its optimizer steps are done (or the data
        ran out, or the NaN/inf guard stopped it); then the export. Returns rank 0's result."""
        cfg, engine, rank, world = self.cfg, self.engine, self.rank, self.world
        device = engine.device
        resumed_from = state.step
        guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_nonfinite, skipped=state.skipped)
        mb = cfg.micro_batch_size
        micro, t_step, tokens, acc, step_ids = 0, time.perf_counter(), 0, {}, []
        last_good, last_epoch, ran_out, real = None, 0, False, 0  # real: this step's batches
        grad_norm: float | None = None  # of the last optimizer step
        self.progress(state.step + 1, "data")  # marks name the optimizer step being worked on
        batches = global_micro_batches(job.dataset, mb * world, cfg.epochs, state.cursor)
        for cursor, epoch, rows in itertools.chain(batches, itertools.repeat((None, None, None))):
            if state.step >= job.optimizer_steps or guard.stop_reason:
                break
            if rows is None:  # the data ran out (skipped batches took the slack)
                ran_out, epoch = True, last_epoch
                if micro % cfg.grad_accum_steps == 0:
                    break
                # Mid-step: DeepSpeed counts micro-steps across rounds, so a half-accumulated
                # step would leak into the next round's first step and shift its step
                # boundaries. Finish it with zero-weight micro-steps (the last finite batch
                # again, loss x 0, on every rank alike): the step is taken from the micro-
                # batches it had, as if the skipped ones had no gradient.
                self.progress(state.step + 1, "forward")
                loss, _ = pair_loss(engine, last_good, cfg.loss_name, cfg.loss_params,
                                    copy.deepcopy(state.running))
                self.progress(state.step + 1, "backward")
                engine.backward(loss * 0.0)
                self.progress(state.step + 1, "optimizer step")
                grad_norm = step_engine(engine, cfg)
                micro += 1
            else:
                state.cursor, last_epoch = cursor + 1, epoch
                inject_stall(rank, state.step + 1)
                ids = [str(i) for i in rows["id"]]
                mine = {k: v[rank * mb:(rank + 1) * mb] for k, v in rows.items()}
                pairs = rows_to_pairs(mine, self.pad_id, self.packing,
                                      share_prompt=cfg.share_prompt, row_tokens=cfg.pack_row_tokens)
                pairs.batch = pairs.batch.to(device)
                self.progress(state.step + 1, "forward")
                loss, out = pair_loss(engine, pairs, cfg.loss_name, cfg.loss_params, state.running)
                loss = inject_nan_gradient(loss, state.step + 1, rank)  # no-op unless a test sets it
                self.progress(state.step + 1, "loss check")
                if not all_ranks(bool(torch.isfinite(loss.detach())), device):
                    guard.record("loss", state.step + 1, ids)
                    continue  # no backward, no step: the next micro-batch takes this one's place
                last_good = pairs
                self.progress(state.step + 1, "backward")
                engine.backward(loss)
                self.progress(state.step + 1, "optimizer step")
                grad_norm = step_engine(engine, cfg)
                micro += 1
                step_ids += ids
                tokens += pair_tokens(mine)
                real += 1
                for k, v in {"loss": float(loss.detach()), **out.metrics}.items():
                    acc[k] = acc.get(k, 0.0) + v
            self.progress(state.step + 1, "data")
            if micro % cfg.grad_accum_steps:
                continue
            state.step += 1
            if getattr(engine.optimizer, "overflow", False):  # DeepSpeed skipped a NaN/inf update
                guard.record("gradient", state.step, step_ids)
            elapsed = time.perf_counter() - t_step
            acc = {k: v / real for k, v in acc.items()}  # means over the step's real batches
            acc.update({"tokens_per_s": tokens / elapsed, "pairs_per_s": mb * real / elapsed})
            self.progress(state.step, "metrics")
            metrics = _mean_across_ranks(acc)
            metrics["tokens_per_s"] *= world  # throughput of the whole group
            metrics["pairs_per_s"] *= world
            metrics.update({"step": state.step, "epoch": epoch,
                            "lr": engine.lr_scheduler.get_last_lr()[0],
                            "grad_norm": grad_norm if grad_norm is not None else float("nan"),
                            "nonfinite_skipped": guard.skipped, "resumed_from": resumed_from,
                            "batch_digest": batch_digest(step_ids)})
            if rank == 0 and self.sink is not None:
                self.sink.log.remote("train", metrics)
            if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0
                    and state.step < job.optimizer_steps and not guard.stop_reason):
                self.progress(state.step, "checkpoint")
                self.save(job, state, metrics, guard)
            # Per-step metrics go to the sink only: a Ray Train report is a barrier that waits
            # for the controller's poll (~2 s), so reporting every step would cap the step rate.
            acc, tokens, step_ids, real, t_step = {}, 0, [], 0, time.perf_counter()
            self.progress(state.step + 1, "data")
        self.progress(state.step, "export")
        if not guard.stop_reason and not all_ranks(local_weights_finite(engine.module), device):
            guard.record("weights", state.step, [])
        if guard.stop_reason:  # a clean stop, not an error: the driver raises it, no retry
            return {"stopped": guard.stop_reason, "step": state.step,
                    "nonfinite_events": guard.events}
        offered = self.export(Path(job.out_dir))
        return {"step": state.step, "nonfinite_skipped": guard.skipped,
                "running_mean": state.running.mean,
                "data_exhausted": ran_out, **({"weights": offered} if offered else {})}

    def save(self, job: RoundJob, state: LoopState, metrics: dict[str, Any],
             guard: NonFiniteGuard) -> None:
        checkpoint.save(self.engine, state, metrics, guard, self.engine.device, self.rank,
                        job.round_index, job.key)

    def export(self, out_dir: Path) -> list[Any] | None:
        """Gather ZeRO-3 shards into one state dict (DeepSpeed gathers one parameter at a
        time); rank 0 saves a HF safetensors model to out_dir/model (with LoRA: the merged
        model there, the adapter in out_dir/adapter). With train.weight_transfer
        'object_store' (full weights), rank 0 also puts them into Ray's object store for the
        engines and returns the references (workers.weight_sync), else None."""
        engine = self.engine
        if self.cfg.zero_stage == 3:
            state = engine._zero3_consolidated_16bit_state_dict()  # every rank must call it
        else:
            state = engine.module.state_dict()
        if self.rank != 0:
            return None
        prefix, out = "lm.", out_dir / "model"
        offered = None
        if self.peft is not None:
            lora.export(state, self.peft, prefix, out_dir / "adapter", out)
        else:
            weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            engine.module.lm.save_pretrained(out, state_dict=weights, safe_serialization=True)
            if self.cfg.weight_transfer == "object_store":
                offered = weight_sync.offer(weights)
        self.tokenizer.save_pretrained(out)
        return offered


def next_job(coordinator: Any, after: int, watchdog: Watchdog | None) -> RoundJob | None:
    """Wait (idle, not stalled) for the next round past `after`; None when told to stop."""
    import ray

    if watchdog is not None:
        watchdog.idle()
    while True:
        job = ray.get(coordinator.next_job.remote(after, WAIT_S), timeout=WAIT_S + 60)
        if job == STOP:
            return None
        if job is not None:
            return RoundJob(**job)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: the watchdog around `_train_rounds`, and permanent errors
    recorded on the board so that a restarted group ends at once instead of failing again."""
    import ray
    import ray.train

    entered = time.time()
    handles = {k: config.pop(k, None) for k in TrainLoopConfig.HANDLES}
    cfg = TrainLoopConfig(**config)
    os.environ.update(cfg.extra_env)
    board = handles["progress_board"]
    rank = ray.train.get_context().get_world_rank()
    if board is not None and ray.get(board.get_permanent.remote(), timeout=60) is not None:
        return  # an earlier attempt hit an error a retry repeats: the driver raises it
    watchdog = Watchdog(f"rank {rank}", cfg.stall_timeout_s, board) if board is not None else None
    try:
        _train_rounds(cfg, handles, watchdog, entered)
    except Exception as err:
        if board is not None and is_permanent(err):
            ray.get(board.report_permanent.remote(f"rank {rank}", watchdog.step,
                                                  f"{type(err).__name__}: {err}",
                                                  traceback.format_exc()), timeout=60)
        raise
    finally:
        if watchdog is not None:
            watchdog.close()


def _train_rounds(cfg: TrainLoopConfig, handles: dict[str, Any], watchdog: Watchdog | None,
                  entered: float) -> None:
    """Round after round until the driver stops the run. Only the first round a group takes
    can resume a checkpoint (Ray Train's latest when the group started)."""
    import ray
    import ray.train

    coordinator = handles["coordinator"]
    recipe = DPORecipe(cfg, handles["metrics_sink"], watchdog)
    ckpt, after = ray.train.get_checkpoint(), -1
    while (job := next_job(coordinator, after, watchdog)) is not None:
        if recipe.engine is None:
            recipe.setup(job.policy_path)
            if recipe.rank == 0:
                coordinator.started.remote(recipe.world, time.time() - entered,
                                           recipe.cfg.zero_stage, torch.get_num_threads())
        resume = ckpt if checkpoint.resumes(ckpt, job.round_index, job.key) else None
        result = recipe.train_round(job, recipe.begin_round(job, resume))
        ckpt, after = None, job.round_index
        if recipe.rank == 0:
            ray.get(coordinator.finish.remote(job.round_index, result), timeout=60)
