"""Preference losses over per-sequence log-probs: registry, `compute_loss`, parameter discovery.

Usage: `out = compute_loss("sigmoid", PairLogps(...), beta=0.1)`; `out.mean()` is the batch loss.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from .core import LossInputError, LossOutput, PairLogps
from .principled import principled
from .reference_free import cpo, orpo, simpo
from .trl import (
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_pair,
    discopop,
    exo_pair,
    hinge,
    ipo,
    nca_pair,
    robust,
    sft,
    sigmoid,
    sigmoid_norm,
    sppo_hard,
)
from .unpaired import bco, kto
from .variants import dpop, fdpo, ld_dpo, npo, rpo, sppo, wpo

LossFn = Callable[..., LossOutput]

LOSSES: dict[str, LossFn] = {
    # TRL DPOTrainer loss_type names
    "sigmoid": sigmoid,
    "hinge": hinge,
    "ipo": ipo,
    "exo_pair": exo_pair,
    "nca_pair": nca_pair,
    "robust": robust,
    "bco_pair": bco_pair,
    "sppo_hard": sppo_hard,
    "aot": aot,
    "aot_unpaired": aot_unpaired,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "discopop": discopop,
    "sft": sft,
    "sigmoid_norm": sigmoid_norm,
    # the project's loss
    "principled": principled,
    # reference-free
    "simpo": simpo,
    "cpo": cpo,
    "orpo": orpo,
    # reference-based paper variants
    "rpo": rpo,
    "fdpo": fdpo,
    "dpop": dpop,
    "npo": npo,
    "wpo": wpo,
    "ld_dpo": ld_dpo,
    "sppo": sppo,
    # unpaired
    "kto": kto,
    "bco": bco,
}

# What each loss needs besides the policy's summed log-probs and token counts. The pipeline
# produces each need somewhere (pipeline.config.NEED_SOURCES says where, and which round
# modes cannot); config validation refuses a loss whose needs the round mode cannot meet.
NEEDS: dict[str, str] = {
    "reference": "reference log-probs ref_chosen/ref_rejected (the reference stage)",
    "scores": "finite chosen/rejected scores on every pair",
    "kl_pairs": "log-probs of mismatched completions (kl_policy, kl_ref) for the KL estimate",
    "token_stats": "per-token statistics of the policy's distribution (chosen/rejected_wpo_logw)",
    "prefix": "log-probs of the first min(|y_w|, |y_l|) response tokens (policy and reference)",
    "win_rates": "win rates P̂(y ≻ π_t | x) of each response (chosen/rejected_winrate)",
    "running_stats": "a running mean of the batch rewards, kept across steps (bco_delta)",
}
_REF = frozenset({"reference"})
LossNeeds = frozenset[str] | Callable[[Mapping[str, Any]], frozenset[str]]
LOSS_NEEDS: dict[str, LossNeeds] = {
    **{name: _REF for name in LOSSES},
    "simpo": frozenset(), "cpo": frozenset(), "orpo": frozenset(), "sft": frozenset(),
    "principled": lambda p: _REF | ({"scores"} if p["target"] == "scores" else set()),
    "wpo": _REF | {"token_stats"},
    "ld_dpo": _REF | {"prefix"},
    "sppo": _REF | {"win_rates"},
    "kto": _REF | {"kl_pairs"},
    "bco": _REF | {"running_stats"},
}

__all__ = [
    "LOSSES",
    "LOSS_NEEDS",
    "NEEDS",
    "LossInputError",
    "LossOutput",
    "PairLogps",
    "compute_loss",
    "loss_needs",
    "loss_params",
    "resolve_params",
]


def loss_needs(name: str, params: Mapping[str, Any]) -> frozenset[str]:
    """What loss `name` with resolved `params` needs (keys of NEEDS)."""
    _lookup(name)
    needs = LOSS_NEEDS[name]
    return frozenset(needs(params) if callable(needs) else needs)


def loss_params(name: str) -> dict[str, Any]:
    """The parameters of loss `name` with their defaults."""
    fn = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    }


def resolve_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` checked against loss `name` (names, types, choices, β > 0), defaults filled in."""
    defaults = loss_params(name)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise LossInputError(
            f"unknown parameter(s) {unknown} for loss {name!r}; "
            f"valid parameters: {sorted(defaults)}"
        )
    hints = typing.get_type_hints(LOSSES[name])
    for key, value in params.items():
        _check_type(name, key, value, hints[key])
    resolved = {**defaults, **params}
    if "beta" in resolved and not resolved["beta"] > 0:
        raise LossInputError(f"loss {name!r}: beta must be > 0, got {resolved['beta']}")
    return resolved


def compute_loss(name: str, batch: PairLogps, **params: Any) -> LossOutput:
    """Per-pair losses, detached rewards, weights and metrics of loss `name`, in ≥ float32.

    Metrics added to the loss's own: rewards/{chosen,rejected,accuracies,margins},
    logps/{chosen,rejected}, ranking/accuracy = mean(pw > pl) and
    ranking/accuracy_len_norm = mean(pw/|y_w| > pl/|y_l|).
    """
    kwargs = resolve_params(name, params)
    batch.validate()
    batch = batch.upcast()
    try:
        out = LOSSES[name](batch, **kwargs)
    except LossInputError as err:
        raise LossInputError(f"loss {name!r}: {err}") from None
    weights = out.weights if out.weights is not None else torch.ones_like(out.losses.detach())
    metrics = {**_common_metrics(batch, out), **out.metrics}
    return LossOutput(
        out.losses, out.chosen_rewards.detach(), out.rejected_rewards.detach(), metrics, weights
    )


@torch.no_grad()
def _common_metrics(batch: PairLogps, out: LossOutput) -> dict[str, float]:
    cr, rr = out.chosen_rewards.float(), out.rejected_rewards.float()
    pw, pl = batch.policy_chosen.float(), batch.policy_rejected.float()
    metrics = {
        "rewards/chosen": cr.mean().item(),
        "rewards/rejected": rr.mean().item(),
        "rewards/accuracies": (cr > rr).float().mean().item(),
        "rewards/margins": (cr - rr).mean().item(),
        "logps/chosen": pw.mean().item(),
        "logps/rejected": pl.mean().item(),
        "ranking/accuracy": (pw > pl).float().mean().item(),
    }
    if batch.chosen_len is not None and batch.rejected_len is not None:
        lw, ll = batch.chosen_len.clamp(min=1.0), batch.rejected_len.clamp(min=1.0)
        metrics["ranking/accuracy_len_norm"] = (pw / lw > pl / ll).float().mean().item()
    return metrics


def _lookup(name: str) -> LossFn:
    if name not in LOSSES:
        raise LossInputError(f"unknown loss {name!r}; valid losses: {sorted(LOSSES)}")
    return LOSSES[name]


def _check_type(name: str, key: str, value: Any, hint: Any) -> None:
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise LossInputError(
                f"loss {name!r}: {key} must be one of {list(choices)}, got {value!r}"
            )
    elif hint is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise LossInputError(f"loss {name!r}: {key} must be a number, got {value!r}")
