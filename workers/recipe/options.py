"""What the workers are told: the run's loop options (once) and each round's job, and what
follows from them (DeepSpeed config, optimizer, LR schedule, attention kernel).

`TrainLoopConfig` is built on the driver from the validated run config in one place
(`pipeline.stages.train.loop_config`) and reaches the workers as one plain dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class TrainLoopConfig:
    tokenizer_path: str
    loss_name: str
    loss_params: dict[str, Any]
    zero_stage: int | str  # 0-3, or 'auto' until the workers resolve it (auto_zero_stage)
    micro_batch_size: int
    grad_accum_steps: int
    epochs: int
    learning_rate: float
    lr_schedule: str
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
    lora: dict[str, Any] | None = None  # pipeline.config.LoraConfig as a dict (workers.lora)
    logprob_chunk_size: int = 1024
    head_calls: int | None = None  # LM-head calls per forward, the same on every rank (logprobs)
    stall_timeout_s: float = 300.0  # no progress for this long ends the worker (watchdog)
    checkpoint_every: int = 0  # optimizer steps between resumable DeepSpeed checkpoints
    on_nonfinite: str = "skip"  # 'skip' | 'stop' (see workers.nonfinite)
    max_nonfinite: int = 10
    metrics_sink: Any = None  # a MetricsSink actor handle, or None
    progress_board: Any = None  # a workers.watchdog.ProgressBoard actor handle, or None
    coordinator: Any = None  # a workers.recipe.coordinator.RoundCoordinator actor handle
    weight_transfer: str = "disk"  # 'disk' | 'object_store' (pipeline.config.TrainConfig)
    extra_env: dict[str, str] = field(default_factory=dict)

    HANDLES = ("metrics_sink", "progress_board", "coordinator")  # actor handles, not copied

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update({k: getattr(self, k) for k in self.HANDLES})
        return d


@dataclass
class RoundJob:
    """One round's training, as the driver's train stage hands it to the worker group.

    Every round starts a fresh optimizer and LR schedule from the weights the previous round
    ended with (`policy_path` holds them too: a group that starts at this round loads them),
    and reads `dataset` (the round's pairs in training order, materialised) whole."""

    round_index: int
    key: str  # the train stage's input hash: a checkpoint of another key is not resumed
    policy_path: str
    optimizer_steps: int  # identical on every rank
    warmup_steps: int
    out_dir: str  # rank 0 writes the HF model to out_dir/model
    dataset: Any = None  # a Ray MaterializedDataset

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}  # no deep copy


STATE_BYTES_PER_PARAMETER = 16  # fp32 weights + gradients + Adam's two moments
AUTO_REPLICA_SHARE = 0.25  # auto: replicate when the state takes at most this much memory


def training_state_bytes(parameters: int, trainable: int | None = None, bf16: bool = False) -> int:
    """Bytes of one replica of the training state (activations aside): a trainable parameter
    STATE_BYTES_PER_PARAMETER (fp32 weight, gradient and Adam's two moments; or bf16 weight
    and gradient with an fp32 master copy and moments), a frozen one (LoRA's base) only its
    weight. `trainable` defaults to all of them (full fine-tuning)."""
    trainable = parameters if trainable is None else trainable
    return STATE_BYTES_PER_PARAMETER * trainable + (2 if bf16 else 4) * (parameters - trainable)


def auto_zero_stage(cfg: TrainLoopConfig, parameters: int, worker_memory: int,
                    trainable: int | None = None) -> int:
    """train.zero_stage 'auto': ZeRO-0 (plain data parallel: no per-module parameter gathers,
    no gradient partitioning; the step is the same) when training in fp32 without offload
    and the replicated training state (`training_state_bytes`) takes at most
    AUTO_REPLICA_SHARE of the smallest worker's memory (the rest is for activations); ZeRO-3
    otherwise. `parameters` is the policy's parameter count (`trainable` of them trained:
    all unless LoRA), `worker_memory` the smallest worker's device memory in bytes.
    (bf16 keeps ZeRO-3: its fp32-master handling between rounds is ZeRO-3's, see
    DPORecipe.begin_round.) Any other value is returned as given."""
    if cfg.zero_stage != "auto":
        return int(cfg.zero_stage)
    if cfg.bf16 or cfg.optimizer == "cpu_adam" or cfg.offload_params:
        return 3
    fits = training_state_bytes(parameters, trainable) <= AUTO_REPLICA_SHARE * worker_memory
    return 0 if fits else 3


def trainer_clips(cfg: TrainLoopConfig) -> bool:
    """ZeRO-0 in fp32: there DeepSpeed would clip the module's gradients and drop the norm, so
    the trainer clips them itself in the same pass that takes the norm (recipe.step_engine)
    and DeepSpeed is told not to. ZeRO-1..3 and 16-bit optimizers clip and keep the norm."""
    return cfg.zero_stage == 0 and not cfg.bf16


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
        "gradient_clipping": cfg.grad_clip if cfg.grad_clip > 0 and not trainer_clips(cfg) else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(cfg: TrainLoopConfig, params) -> torch.optim.Optimizer:
    """torch AdamW, or DeepSpeed's CPU Adam (the same update, run on the host over the
    offloaded optimizer states; `deepspeed_config` turns the offload on).

    torch AdamW runs fused (one kernel over all the parameters, as HF Trainer's default
    `adamw_torch_fused`) where torch has the fused kernel for the parameters' device: the
    same update as the per-parameter loop, about 5x faster on CPU for a small model."""
    params = list(params)
    kwargs = {"lr": cfg.learning_rate, "betas": tuple(cfg.adam_betas),
              "weight_decay": cfg.weight_decay, "eps": 1e-8}
    if cfg.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:  # torch has no fused kernel for these parameters' device or dtype
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
