"""LoRA with the peft library: the policy trains low-rank adapters, its base stays frozen.

- `wrap` / `load`: the base model with fresh adapters (`model.lora`), or with an exported
  adapter (a worker group that starts at a later round continues the adapter it trained).
- `export`: from the state dict the trainer gathered (any ZeRO stage), the adapter in PEFT
  format (`PeftModel.from_pretrained` loads it) and the merged HF model, W + scaling·B·A.
- `inspect`: the config's targets on the model built on the meta device (nothing loaded), so
  the driver refuses bad ones before any cluster work and `--dry-run` can count parameters.

An exported adapter names its base (`base_model_name_or_path` in adapter_config.json, an
absolute path), so its directory is all a trainer or a vLLM engine needs (`is_adapter`,
`base_of`). The reference of a LoRA run is the base: no second model anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it runs (the driver imports this module too)
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER = "default"  # peft's name of the one adapter
# max_lora_rank values vLLM accepts (vllm.config.lora); adapters of a smaller rank are padded
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_config(path: str | Path) -> dict[str, Any]:
    """The adapter_config.json of the adapter at `path` (PEFT's: r, base_model_name_or_path...)."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text())


def base_of(path: str | Path) -> str:
    """The full model behind `path`: an adapter's base, or `path` itself."""
    return adapter_config(path)["base_model_name_or_path"] if is_adapter(path) else str(path)


def vllm_max_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that serves adapters of rank r."""
    return next(x for x in VLLM_LORA_RANKS if x >= r)


def peft_config(lora: dict[str, Any]):
    """peft's LoraConfig for `model.lora` (pipeline.config.LoraConfig as a dict)."""
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], use_rslora=lora["use_rslora"],
                      bias="none", task_type="CAUSAL_LM")


def wrap(model: torch.nn.Module, lora: dict[str, Any], base_path: str):
    """`model` with fresh adapters (B = 0: the policy starts equal to the base), in the
    model's dtype on every ZeRO stage (peft would keep bf16 models' adapters in fp32); the
    adapter names its base by absolute path (peft would take the string the model was
    loaded from)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config(lora), autocast_adapter_dtype=False)
    peft_model.peft_config[ADAPTER].base_model_name_or_path = str(Path(base_path).resolve())
    return peft_model


def load(model: torch.nn.Module, adapter_path: str):
    """`model` (the adapter's base) with the adapter at `adapter_path`, trainable."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_path, is_trainable=True,
                                     autocast_adapter_dtype=False)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module
                      ) -> dict[str, torch.Tensor]:
    """The merged model's state dict from `state` (keys of `model`, the model peft injected
    its layers into): each adapted Linear's weight becomes W + scaling·B·A (peft's delta
    of a Linear without fan_in_fan_out, the only layers `inspect` accepts), the adapter
    tensors go. `model` gives each layer's scaling (plain numbers, never partitioned)."""
    out = dict(state)
    for name, layer in _lora_layers(model).items():
        a = out.pop(f"{name}.lora_A.{ADAPTER}.weight")
        b = out.pop(f"{name}.lora_B.{ADAPTER}.weight")
        base = out.pop(f"{name}.base_layer.weight")
        delta = (b.float() @ a.float()) * layer.scaling[ADAPTER]
        out[f"{name}.weight"] = (base.float() + delta).to(base.dtype)
        if f"{name}.base_layer.bias" in out:
            out[f"{name}.bias"] = out.pop(f"{name}.base_layer.bias")
    return out


def export(state: dict[str, torch.Tensor], peft_model: Any, prefix: str, adapter_dir: Path,
           model_dir: Path) -> None:
    """Write the adapter (PEFT format) to `adapter_dir` and the merged HF model (safetensors)
    to `model_dir`, from `state`: the gathered state dict, keys of the injected model after
    `prefix` (what the trainer's DeepSpeed module calls them)."""
    inner = peft_model.base_model.model
    relative = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    peft_model.save_pretrained(adapter_dir, safe_serialization=True,
                               state_dict={f"base_model.model.{k}": v for k, v in relative.items()})
    inner.save_pretrained(model_dir, state_dict=merged_state_dict(relative, inner),
                          safe_serialization=True)


@dataclass(frozen=True)
class LoraPlan:
    """What `model.lora` makes of a model: trainable vs total parameters, and the layers."""

    trainable: int
    total: int
    layers: int


def inspect(base_path: str, lora: dict[str, Any], trust_remote_code: bool = False) -> LoraPlan:
    """The adapters on `base_path`'s model built on the meta device; a ValueError naming the
    `model.lora` key when a target is absent, not a Linear layer, or smaller than the rank."""
    import torch
    from peft import get_peft_model
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    layers = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if n}
    linear = sorted(k for k, m in layers.items() if isinstance(m, nn.Linear) and m is not head)
    for t in [] if lora["target_modules"] == "all-linear" else lora["target_modules"]:
        if t not in layers:
            problem = f"{t!r} is no module of {base_path}"
        elif layers[t] is head:
            problem = f"{t!r} is the LM head, which vLLM serves no adapter on"
        elif not isinstance(layers[t], nn.Linear):
            problem = f"{t!r} is a {type(layers[t]).__name__}, not a Linear layer"
        else:
            continue
        raise ValueError(f"model.lora.target_modules: {problem}; adapters go on the linear"
                         f" layers ({', '.join(linear)}) or all-linear")
    try:
        peft_model = get_peft_model(model, peft_config(lora))
    except ValueError as err:  # peft's own check (e.g. all-linear on a model without any)
        raise ValueError(f"model.lora.target_modules: {err}") from None
    layers = _lora_layers(peft_model)
    for name, layer in layers.items():
        base = layer.get_base_layer()
        if not isinstance(base, nn.Linear):  # a name that matched a module inside another
            raise ValueError(f"model.lora.target_modules: {name} is a"  # noqa: TRY004 (config)
                             f" {type(base).__name__}, not a Linear layer")
        smallest = min(base.in_features, base.out_features)
        if lora["r"] > smallest:
            raise ValueError(f"model.lora.r: {lora['r']} is larger than layer {name}"
                             f" ({base.out_features}×{base.in_features}): a rank is at most"
                             f" {smallest} there")
    trainable = sum(p.numel() for p in trainable_parameters(peft_model))
    total = sum(p.numel() for p in peft_model.parameters())
    return LoraPlan(trainable=trainable, total=total, layers=len(layers))
