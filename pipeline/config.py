"""Typed run configuration: one YAML file in, validated before any cluster work.

Every section is a pydantic model with ``extra="forbid"``, so a typo is an error that names
its key path. Relative paths are taken relative to the current working directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


Dtype = Literal["float32", "bfloat16", "float16", "auto"]


def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    """Custom Ray resources (e.g. {"gpu_node": 0.01}) that pin a stage to node types."""
    for name, amount in value.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name!r} is not a custom resource; use the cpus/gpus fields")
        if not amount > 0:
            raise ValueError(f"custom resource {name!r} needs a positive amount, got {amount}")
    return value


CustomResources = Annotated[dict[str, float], AfterValidator(_custom_resources)]


class LoraConfig(_Section):
    """LoRA (peft): the policy trains low-rank adapters on the base's linear layers, the base
    stays frozen and is the reference (workers.lora)."""

    r: int = Field(16, ge=1, le=512, description="Adapter rank (vLLM serves ranks up to 512).")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is alpha/r·B·A"
                         " (alpha/√r with use_rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input (the"
                           " base model's own dropout is off in preference training).")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Names of the linear layers that get adapters (e.g. [q_proj,"
        " v_proj]), or all-linear: every linear layer but the LM head.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/√r.")
    shared_engine: bool = Field(
        True, description="One vLLM engine pool serves both the reference (the base, no"
        " adapter) and the policy (the round's adapter, loaded in place): no second engine."
        " false: a reference pool of its own (needed when model.reference is another model).")

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: Any) -> Any:
        if not value:
            raise ValueError("empty: name linear layers, or all-linear")
        return value


class ModelConfig(_Section):
    policy: str = Field(description="HF model directory (or hub id) of the initial policy.")
    reference: str | None = Field(None, description="Reference model; defaults to the policy.")
    tokenizer: str | None = Field(None, description="Tokenizer; defaults to the policy's.")
    trust_remote_code: bool = False
    allow_pickle_weights: bool = Field(
        False, description="Accept .bin/.pt (pickle) checkpoints; safetensors only otherwise."
    )
    lora: LoraConfig | None = Field(
        None, description="Train LoRA adapters instead of every weight (null: full fine-tuning).")

    @property
    def reference_path(self) -> str:
        return self.reference or self.policy

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.policy


class FieldMap(_Section):
    """Column (or JSON key) names in the input rows."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    messages: str = "messages"
    conversations: str = "conversations"  # ShareGPT turns ({from, value}), when no prompt/messages
    chosen_score: str = "chosen_score"
    rejected_score: str = "rejected_score"
    id: str = "id"


class PrepareConfig(_Section):
    """How the prepare stage turns rows into tokenized pairs: the columns, the chat template,
    the length limits and truncation, the checks on the text and how much of a source may be
    quarantined. What code that only tokenizes (sampling's prompts, benchmarks) builds."""

    fields: FieldMap = Field(default_factory=FieldMap)
    system_prompt: str | None = None
    max_prompt_tokens: int = Field(256, gt=0)
    max_response_tokens: int = Field(256, gt=0)
    truncation: Literal["keep_end", "keep_start", "truncate_response", "drop"] = Field(
        "keep_end",
        description="Over-length pairs: keep the end (or start) of the prompt and cut responses;"
        " cut responses only (long prompts quarantined); or quarantine the pair.",
    )
    chat_template: Literal["auto", "always"] = Field(
        "auto", description="auto: render message prompts with the tokenizer's chat template and"
        " use string prompts as-is; always: strings become a user turn too.")
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)
    special_tokens_in_text: Literal["quarantine", "allow"] = Field(
        "quarantine", description="Text holding the tokenizer's special tokens (e.g."
        " '<|im_start|>system') would inject roles into the chat template: quarantine the row,"
        " or allow it.")
    control_characters: Literal["keep", "strip", "quarantine"] = Field(
        "keep", description="Form feeds, vertical tabs, DEL, stray C1 and the other C0 controls"
        " (not tab/newline/CR): keep them, strip them (line-breaking ones become a newline), or"
        " quarantine the row. NUL and terminal escapes (ESC, 8-bit CSI/OSC/DCS/...) are always"
        " quarantined.")


class DataConfig(PrepareConfig):
    """The `data` section: the sources, and how they are prepared (PrepareConfig)."""

    train: list[str] = Field(min_length=1, description="Paths, globs or URIs (any pyarrow fs) of"
                             " parquet, JSON, JSON Lines files or save_to_disk directories, or"
                             " HF datasets names in the local cache (org/name[:split]).")
    eval: list[str] = Field(default_factory=list)
    min_score_margin: float | None = Field(
        None, description="Train on the pairs whose chosen_score exceeds rejected_score by more"
        " than this (needs scores); the others are valid rows left out, counted and kept in the"
        " prepare stage's filtered.parquet. 0 drops inverted and tied pairs. Eval pairs, and"
        " the pairs sampled rounds build (rounds.min_margin filters those), are not filtered.")


class LossConfig(_Section):
    name: str = "principled"
    params: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Section):
    # Fields that only say where and how robustly training is scheduled, never what it
    # computes: the train stage's key leaves them out, so changing them does not retrain.
    SCHEDULING_ONLY: ClassVar[frozenset[str]] = frozenset({
        "cpus_per_worker", "placement_strategy", "resources", "checkpoint_every",
        "max_failures", "stall_timeout_s", "weight_transfer"})

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, ge=0)
    gpus_per_worker: float = Field(0, ge=0)
    zero_stage: Literal["auto", 0, 1, 2, 3] = Field(
        "auto", description="DeepSpeed ZeRO stage. auto: decided on the workers before the"
        " model loads: 0 (plain data parallel, no per-module gathers) when training in fp32"
        " and the replicated training state (weights, gradients, Adam moments: 16 bytes a"
        " parameter) takes at most a quarter of each worker's memory; 3 otherwise, and always"
        " with cpu_adam or offload_params (workers.recipe.options.auto_zero_stage).")
    micro_batch_size: int = Field(4, ge=1, description="Pairs per worker per forward.")
    global_batch_size: int = Field(16, ge=1, description="Pairs per optimizer step, all workers.")
    learning_rate: float = Field(5e-6, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    grad_clip: float = Field(1.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    optimizer: Literal["adamw", "cpu_adam"] = Field(
        "adamw", description="adamw: torch AdamW on the workers' device (fused where torch has"
        " the kernel: CPU, CUDA). cpu_adam: DeepSpeed's"
        " CPU Adam with ZeRO-Offload (optimizer states and the update in host memory; needs"
        " zero_stage >= 1).")
    offload_params: bool = Field(
        False, description="ZeRO-3 parameter offload: parameter partitions live in host memory"
        " and are fetched per layer (needs zero_stage: 3). With cpu_adam, a 7B policy fits small"
        " GPUs.")
    gradient_checkpointing: bool = False
    packing: bool = Field(
        True, description="Pack the pairs of a micro-batch into shared rows, no padding between"
        " sequences (exact: equal log-probs and gradients; workers.packing).")
    attention: Literal["auto", "sdpa", "eager", "flex", "flash"] = Field(
        "auto", description="Attention kernel of the trained model. auto: FlexAttention on GPU"
        " with packing (document masks, no padding), SDPA otherwise; flash: flash_attention_2"
        " (needs flash-attn). FlexAttention has no backward on CPU.")
    share_prompt: bool | None = Field(
        None, description="With packing: compute each prompt once, chosen and rejected"
        " continuing from it (exact; not with attention: flash). Default: on whenever packing"
        " is on and attention is not flash.")
    pack_row_tokens: int | None = Field(
        None, gt=0, description="Token budget of a packed row (default: one row per"
        " micro-batch on flex/flash, the longest pair on the CPU mask path).")
    logprob_chunk_size: int = Field(
        1024, gt=0, description="Response positions per LM-head chunk (bounds the full-vocab"
        " logits held at once).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    resources: CustomResources = Field(
        default_factory=dict, description="Custom Ray resources per worker, e.g. {gpu_node: 0.01}.")
    checkpoint_every: int = Field(
        0, ge=0, description="Optimizer steps between DeepSpeed checkpoints a restarted worker"
        " group resumes from (0: none; a failure then restarts the stage's training).")
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts Ray Train attempts (-1: unlimited).")
    on_nonfinite: Literal["skip", "stop"] = Field(
        "skip", description="A NaN/inf loss or gradient: skip that batch and count it, or stop"
        " the run and save the batch's pair ids.")
    max_nonfinite: int = Field(
        10, ge=0, description="With on_nonfinite=skip, stop once more batches than this were skipped.")
    stall_timeout_s: float = Field(
        300, gt=0, description="A worker that makes no progress for this long (a collective"
        " that does not return, a frozen process) is ended with an error naming the round,"
        " step, phase and ranks; then max_failures applies. Also the process-group timeout."
        " Must exceed the longest phase after setup (one step, a checkpoint, the export);"
        " setup (loading the model, building DeepSpeed and its ops) is allowed 3x this.")

    weight_transfer: Literal["disk", "object_store"] = Field(
        "disk", description="How a round's trained weights reach the engines (they are always"
        " exported to the round's model/ directory, which resume and a restarted engine load)."
        " disk: the engines load the exported files. object_store: rank 0 also puts them into"
        " Ray's object store, a decoder layer per object, and the engines load them from"
        " memory, reading no file (for checkpoint storage that is slow to read, e.g. a network"
        " volume; on one machine both cost the same, bench/bench_weight_update.py). The store"
        " then holds one round's weights. LoRA rounds always hand over the adapter's files.")

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size × num_workers ({self.micro_batch_size} × {self.num_workers}"
                f" = {per_step})"
            )
        return self

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> TrainConfig:
        if self.zero_stage == "auto":  # auto takes 3 whenever either is on
            return self
        if self.optimizer == "cpu_adam" and self.zero_stage == 0:
            raise ValueError("train.optimizer: cpu_adam offloads the ZeRO optimizer partitions:"
                             " it needs zero_stage 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"train.offload_params needs zero_stage: 3 (only ZeRO-3 partitions"
                             f" parameters), got zero_stage: {self.zero_stage}")
        return self

    @model_validator(mode="after")
    def _share_prompt_needs_packing(self) -> TrainConfig:
        if self.share_prompt is None:  # the exact fastest layout wherever it can run
            self.share_prompt = self.packing and self.attention != "flash"
            return self
        if self.share_prompt and not self.packing:
            raise ValueError("train.share_prompt needs train.packing: true")
        if self.share_prompt and self.attention == "flash":
            raise ValueError("train.share_prompt cannot use attention: flash (position-id"
                             " boundaries cannot let both continuations see the prompt)")
        return self

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)

    @property
    def bf16(self) -> bool:
        """Train in bf16: precision bf16, or auto on GPU workers."""
        return self.precision == "bf16" or (self.precision == "auto" and self.gpus_per_worker > 0)


class EngineConfig(_Section):
    """vLLM engine arguments we set; anything else goes into ``extra`` verbatim."""

    # settings that change when a stuck call is given up, never what the engine computes:
    # the keys of the stages (and caches) that engines compute leave them out
    SCHEDULING_ONLY: ClassVar[frozenset[str]] = frozenset({"call_timeout_s"})

    dtype: Dtype = "auto"
    max_model_len: int | None = Field(None, gt=0)
    enforce_eager: bool = True
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    kv_cache_space_gib: int = Field(1, ge=1, description="KV-cache size of each engine of this"
                                    " pool on CPU (VLLM_CPU_KVCACHE_SPACE, set per actor).")
    call_timeout_s: float = Field(
        300, gt=0, description="An engine call (one batch) that does not return within this"
        " (an engine start: 3x this) ends its actor with a report of where it was stuck; the"
        " actor is restarted and its batch redone.")
    extra: dict[str, Any] = Field(default_factory=dict)


class ActorPoolConfig(_Section):
    """A pool of Ray Data actors: how many, and what each asks Ray for."""

    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1, ge=0)
    gpus_per_actor: float = Field(0, ge=0)
    batch_size: int = Field(32, ge=1, description="Rows per actor call.")
    resources: CustomResources = Field(
        default_factory=dict, description="Custom Ray resources per actor, e.g. {gpu_node: 0.01}.")


class PoolConfig(ActorPoolConfig):
    """A pool of vLLM engine actors (one engine per actor)."""

    engine: EngineConfig = Field(default_factory=EngineConfig)


class ReferencePoolConfig(PoolConfig):
    cache_dir: str | None = Field(None, description="Reference log-prob cache; default <run_dir>/cache/reference.")


class SamplingConfig(PoolConfig):
    n: int = Field(4, ge=1, description="Responses per prompt.")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, ge=1)
    seed: int = 0


class RoundsConfig(_Section):
    """offline: one round on the given pairs. iterative: after an optional first round on the
    given pairs, every round samples the current policy on the whole prompt pool, scores,
    pairs and trains. online: the same, but each round takes a fresh slice of
    `prompts_per_round` prompts from the (seeded, shuffled) pool, so prompts stream by."""

    count: int = Field(1, ge=1)
    mode: Literal["offline", "iterative", "online"] = "offline"
    reference: Literal["initial", "previous"] = Field(
        "initial", description="Reference of round k: the initial model or round k-1's policy.")
    prompts: list[str] = Field(
        default_factory=list, description="Prompt parquet (column `prompt`: text or messages);"
        " default: the prompts of data.train.")
    prompts_per_round: int | None = Field(None, ge=1)
    pair_rule: Literal["best_vs_worst", "all_above_margin"] = "best_vs_worst"
    min_margin: float = Field(0.0, ge=0, description="Drop pairs whose reward gap is ≤ this"
                              " (ties are always dropped).")
    max_length_ratio: float | None = Field(
        None, gt=1, description="Length guard: drop pairs whose chosen response is more than"
        " this many times longer (in tokens) than the rejected one.")
    rejection_sampling: bool = Field(False, description="RSO: accept each sample with"
                                     " probability exp((r - r_max)/rso_beta) before pairing.")
    rso_beta: float = Field(0.5, gt=0)
    curriculum: bool = Field(False, description="Curry-DPO: train on pairs ordered by reward"
                             " gap, largest (easiest) first, instead of shuffled.")
    seed: int = 0


class RewardConfig(ActorPoolConfig):
    """The score stage's reward: a function (num_actors tasks at once, each asking for
    cpus/gpus_per_actor), or a reward model or a judge in num_actors actors that live for
    the run (pipeline.scorers). A judge's vLLM engine takes its arguments from
    sampling.engine, and a scoring call that does not answer within 5 ×
    sampling.engine.call_timeout_s fails the stage. batch_size: samples per call (a judge
    is called once per prompt, on all its samples)."""

    kind: Literal["function", "reward_model", "judge"] = "function"
    function: str | None = Field(None, description="'module:function' taking (prompts, responses).")
    model: str | None = Field(None, description="Reward model or judge model path.")

    @model_validator(mode="after")
    def _needs_target(self) -> RewardConfig:
        if self.kind == "function" and not self.function:
            raise ValueError("reward.kind 'function' needs reward.function ('module:function')")
        if self.kind != "function" and not self.model:
            raise ValueError(f"reward.kind '{self.kind}' needs reward.model (a model path)")
        if self.function and ":" not in self.function:
            raise ValueError(f"reward.function must be 'module:function', got {self.function!r}")
        if self.kind == "judge" and "batch_size" in self.model_fields_set:
            raise ValueError("reward.batch_size does not apply to kind 'judge' (it is called"
                             " once per prompt, on all of that prompt's samples)")
        return self


class EvalConfig(_Section):
    max_pairs: int | None = Field(None, ge=1)
    num_prompts: int = Field(32, ge=0, description="Held-out prompts sampled for gold win rate.")
    gold_reward: str | None = Field(
        None, description="'module:function' scoring eval samples; default: reward.function.")


class RayConfig(_Section):
    address: str | None = Field(None, description="None: start a local cluster; 'auto' or ray://.")
    num_cpus: int | None = Field(None, ge=1, description="Logical CPUs of a local cluster.")
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    resources: CustomResources = Field(
        default_factory=dict, description="Custom resources of a local cluster (address unset).")


# backend → the module it needs (installed by the `tracking` extra)
TRACKING_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
TrackingBackend = Literal["tensorboard", "mlflow", "wandb"]


class TrackingConfig(_Section):
    """Experiment trackers fed every metrics.jsonl row, like TRL's `report_to`.

    `tracking: [tensorboard, wandb]` is short for `tracking: {backends: [tensorboard, wandb]}`.
    """

    backends: list[TrackingBackend] = Field(
        default_factory=list, description="Trackers to feed; [] writes metrics.jsonl only.")
    run_name: str | None = Field(None, description="Name of the tracked run; default: run_dir's.")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; default: a file store in <run_dir>/mlflow.")
    mlflow_experiment: str = "rayalign"
    wandb_project: str = "rayalign"
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files under <run_dir>/wandb only (`wandb sync` later);"
        " online needs WANDB_API_KEY in the environment, never in the config.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        return {"backends": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _installed(self) -> TrackingConfig:
        import importlib.util

        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"backends lists a tracker twice: {self.backends}")
        for name in self.backends:
            if importlib.util.find_spec(TRACKING_MODULES[name]) is None:
                raise ValueError(f"backend {name!r} needs the {TRACKING_MODULES[name]!r} package:"
                                 " pip install 'rayalign[tracking]'")
        return self


SEEDED_SECTIONS = ("train", "sampling", "rounds")  # the sections whose `seed` the run seed sets


class RunConfig(_Section):
    run_dir: str = "runs/default"
    seed: int | None = Field(
        None, description="The run's seed: when set, it replaces train.seed (data order),"
        " sampling.seed (samples) and rounds.seed (prompt order, pairing), so that one"
        " override (`seed=1`, or a sweep's `seed=0,1,2`) reseeds a whole run.")
    min_free_gib: float = Field(
        1.0, ge=0, description="Free disk space run_dir needs before any work starts.")
    model: ModelConfig
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    reference: ReferencePoolConfig = Field(default_factory=ReferencePoolConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    rounds: RoundsConfig = Field(default_factory=RoundsConfig)
    reward: RewardConfig | None = None
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.seed is not None:
            for name in SEEDED_SECTIONS:
                getattr(self, name).seed = self.seed
        if self.rounds.mode != "offline" and self.reward is None:
            raise ValueError(f"rounds.mode '{self.rounds.mode}' samples new pairs: it needs a"
                             " 'reward' section")
        if not self.model.allow_pickle_weights:
            for key, pool in (("reference", self.reference), ("sampling", self.sampling)):
                fmt = pool.engine.extra.get("load_format", "safetensors")
                if fmt != "safetensors":
                    raise ValueError(f"{key}.engine.extra.load_format '{fmt}' may load pickle"
                                     " weights: set model.allow_pickle_weights: true to allow it")
        lora = self.model.lora
        if lora is not None and lora.shared_engine and self.model.reference is not None and (
                os.path.abspath(self.model.reference) != os.path.abspath(self.model.policy)):
            raise ValueError("model.lora.shared_engine: one engine serves the reference as the"
                             f" base model (model.policy), but model.reference is another model"
                             f" ({self.model.reference}): unset model.reference, or set"
                             " model.lora.shared_engine: false (a reference pool of its own)")
        if self.rounds.mode == "offline" and self.rounds.count > 1:
            raise ValueError("rounds.mode 'offline' with rounds.count > 1 would retrain on the"
                             " same pairs; use mode 'iterative' or 'online'")
        return self


def _format_errors(err: ValidationError, source: str, overridden: Iterable[str] = ()) -> str:
    """One line per problem, `key.path: message`; a key set by an override says so."""
    lines = [f"{source}: {err.error_count()} problem(s) in the config:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if any(where == k or where.startswith(k + ".") or k.startswith(where + ".")
               for k in overridden):
            msg += " (set by a command-line override)"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def validate_loss(cfg: LossConfig) -> dict[str, Any]:
    """Resolve the loss name and parameters against the registry; return effective params."""
    from workers.losses import LOSSES, LossInputError, resolve_params

    if cfg.name not in LOSSES:
        raise ConfigError(f"loss.name: unknown loss {cfg.name!r}; valid: {', '.join(sorted(LOSSES))}")
    try:
        return resolve_params(cfg.name, cfg.params)
    except LossInputError as err:
        raise ConfigError(f"loss.params: {err}") from None


def loss_needs(cfg: LossConfig) -> frozenset[str]:
    """What the configured loss needs (keys of workers.losses.NEEDS), read from the registry."""
    from workers.losses import loss_needs as registry_needs

    return registry_needs(cfg.name, validate_loss(cfg))


# Loss needs that only a sampled round (iterative/online) produces, and why.
SAMPLED_ONLY_NEEDS = {
    "win_rates": "the pair stage estimates them from each prompt's sampling.n scored samples",
}


def needs_sampled_rounds(cfg: LossConfig) -> bool:
    """Whether every round must sample (round 0 too, data.train then gives prompts only)."""
    return bool(loss_needs(cfg) & SAMPLED_ONLY_NEEDS.keys())


def check_loss_needs(cfg: RunConfig) -> None:
    """Refuse a loss whose needs the round mode cannot meet, naming the need and why."""
    from workers.losses import NEEDS

    if cfg.rounds.mode != "offline":
        return
    for need in sorted(loss_needs(cfg.loss) & SAMPLED_ONLY_NEEDS.keys()):
        raise ConfigError(
            f"loss.name: {cfg.loss.name!r} needs {need} ({NEEDS[need]}), which rounds.mode"
            f" 'offline' cannot produce: it trains on the given pairs only, and"
            f" {SAMPLED_ONLY_NEEDS[need]}. Use rounds.mode 'iterative' or 'online' (every round"
            " then samples), or a loss without this need (e.g. sppo_hard for sppo)")


def parse_config(raw: dict[str, Any], source: str = "<config>",
                 overridden: Iterable[str] = ()) -> RunConfig:
    """Validate a config mapping; raise ConfigError naming the source and key paths
    (`overridden`: the dotted keys an override set, marked as such in the errors)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping, got {type(raw).__name__}")
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, overridden)) from None
    try:
        validate_loss(cfg.loss)
        check_loss_needs(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


# YAML 1.1 reads 1e-4 as a string (it wants 1.0e-4); an override means the number
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def yaml_numbers(value: Any) -> Any:
    """`value` (parsed YAML) with exponent floats YAML 1.1 read as strings ('1e-4') as floats."""
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        return float(value)
    if isinstance(value, list):
        return [yaml_numbers(x) for x in value]
    if isinstance(value, dict):
        return {k: yaml_numbers(x) for k, x in value.items()}
    return value


def _override_value(text: str) -> Any:
    """An override's value as YAML: `3`, `1e-4`, `null`, `[0.9,0.99]`, `{beta: 0.1}`, `ipo`."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text  # not YAML (e.g. 'a: b: c'): the plain string, validated like any other
    return yaml_numbers(value)


def parse_overrides(items: Iterable[str], flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Command-line overrides `key.path=value` (torchtune/Hydra style) as {dotted key: value};
    values are YAML scalars, lists or mappings. A later override of a key wins; `flags`
    ({dotted key: value}, e.g. from --run-dir) win over all, those set to None are ignored."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.path=value, e.g."
                              " train.learning_rate=1e-4")
        out[key] = _override_value(text)
    out.update({k: v for k, v in (flags or {}).items() if v is not None})
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """`raw` with each dotted key set (missing or null sections are created); the keys
    themselves are checked by validation, like the file's."""
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"{source}: override {dotted}: {where} is"
                                  f" {node!r}, not a section with keys")
        node[leaf] = value
    return raw


def read_config_file(path: Path) -> Any:
    """A config file's YAML as written (before overrides and validation)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return raw or {}


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config, apply dotted-key overrides (e.g. {"run_dir": "x"}, see
    parse_overrides), validate the result like a file."""
    path = Path(path)
    raw = read_config_file(path)
    if overrides:
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a mapping, got {type(raw).__name__}")
        raw = apply_overrides(raw, overrides, str(path))
    return parse_config(raw, str(path), overrides or ())
