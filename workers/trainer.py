"""The Ray Train worker loop: DeepSpeed init, micro-steps over the dataset shard, HF export.

Runs inside each Ray Train worker. Everything it needs arrives in one plain dict
(`TrainLoopConfig.to_dict()`), built on the driver from the validated run config.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from workers.logprobs import ResponseLogps
from workers.packing import attention_mode
from workers.train_step import pair_loss, rows_to_pairs


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
    packing: bool = False  # pack pairs into shared rows (workers.packing)
    trust_remote_code: bool = False
    logprob_chunk_size: int = 4096
    metrics_sink: Any = None  # a MetricsSink actor handle, or None
    extra_env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics_sink"] = self.metrics_sink
        return d


def deepspeed_config(cfg: TrainLoopConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
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
        use_safetensors=True)
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from ray.train import Checkpoint
    from transformers import AutoTokenizer

    sink = config.pop("metrics_sink", None)
    cfg = TrainLoopConfig(**config)
    os.environ.update(cfg.extra_env)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)

    ds_config = deepspeed_config(cfg)
    model, _keep_alive = _load_policy(cfg, ds_config)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path,
                                              trust_remote_code=cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                  betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.optimizer_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=ResponseLogps(model, cfg.logprob_chunk_size), optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        dist_init_required=False)
    device = engine.device

    packing = attention_mode(model) if cfg.packing else None
    shard = ray.train.get_dataset_shard("train")
    step, micro, t_step = 0, 0, time.perf_counter()
    acc: dict[str, float] = {}
    tokens = 0
    for epoch in range(cfg.epochs):
        for rows in shard.iter_batches(batch_size=cfg.micro_batch_size, batch_format="numpy",
                                       drop_last=True):
            if step >= cfg.optimizer_steps:
                break
            pairs = rows_to_pairs(rows, pad_id, packing)
            pairs.batch = pairs.batch.to(device)
            loss, out = pair_loss(engine, pairs, cfg.loss_name, cfg.loss_params)
            engine.backward(loss)
            engine.step()
            micro += 1
            tokens += pairs.batch.real_tokens
            for k, v in {"loss": float(loss.detach()), **out.metrics}.items():
                acc[k] = acc.get(k, 0.0) + v / cfg.grad_accum_steps
            if micro % cfg.grad_accum_steps:
                continue
            step += 1
            elapsed = time.perf_counter() - t_step
            acc.update({"tokens_per_s": tokens / elapsed,
                        "pairs_per_s": cfg.micro_batch_size * cfg.grad_accum_steps / elapsed})
            metrics = _mean_across_ranks(acc)
            metrics["tokens_per_s"] *= world  # throughput of the whole group
            metrics["pairs_per_s"] *= world
            grad_norm = engine.get_global_grad_norm()
            metrics.update({"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")})
            if rank == 0 and sink is not None:
                sink.log.remote("train", metrics)
            ray.train.report(metrics)
            acc, tokens, t_step = {}, 0, time.perf_counter()
    if step < cfg.optimizer_steps:
        raise RuntimeError(f"rank {rank}: data ran out after {step} of {cfg.optimizer_steps}"
                           " optimizer steps; shards are unequal")
    _export_hf(engine, tokenizer, cfg, rank, {"step": step}, Checkpoint)


def _export_hf(engine, tokenizer, cfg: TrainLoopConfig, rank: int, metrics: dict[str, Any],
               checkpoint_cls) -> None:
    """Gather ZeRO-3 shards into one state dict and save a HF safetensors checkpoint."""
    import ray.train

    if cfg.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # every rank must call it
    else:
        state = engine.module.state_dict()
    if rank != 0:
        ray.train.report(metrics)
        return
    prefix = "lm."
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    with tempfile.TemporaryDirectory() as tmp:
        engine.module.lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        ray.train.report(metrics, checkpoint=checkpoint_cls.from_directory(tmp))
