"""Batch and output types shared by every loss, plus the small helpers the losses are built from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


class LossInputError(ValueError):
    """A loss was called with a missing batch field or an out-of-range parameter."""


@dataclass
class PairLogps:
    """Per-sequence log-probs of B preference pairs (x, y_w, y_l); each tensor is 1-D of length B.

    Log-probs are summed over response tokens (prompt and padding excluded).

    policy_chosen, policy_rejected  log π_θ(y_w|x), log π_θ(y_l|x)
    ref_chosen, ref_rejected        log π_ref(y_w|x), log π_ref(y_l|x); None for the
                                    reference-free losses (simpo, cpo, orpo, sft)
    chosen_len, rejected_len        response token counts |y_w|, |y_l|
    chosen_score, rejected_score    reward-model scores s_w, s_l (principled, target "scores")
    preference_prob                 P(y_w ≻ y_l) per pair (principled, target "bradley_terry")
    chosen_wpo_logw, rejected_wpo_logw
                                    log WPO weight of each sequence,
                                    (1/|y|)·Σ_t [log p_t(y_t) − log Σ_v p_t(v)²], computed by the
                                    trainer under no_grad (wpo)
    policy_chosen_prefix, policy_rejected_prefix, ref_chosen_prefix, ref_rejected_prefix
                                    log-probs summed over the first min(|y_w|, |y_l|) response
                                    tokens (ld_dpo)
    chosen_winrate, rejected_winrate
                                    estimated win rate P̂(y ≻ π_t | x) of each response (sppo)
    kl_policy, kl_ref               log π_θ(y'|x), log π_ref(y'|x) of mismatched completions y'
                                    (the previous example's completion) for kto's KL estimate;
                                    any length: pass them gathered across ranks for TRL's
                                    cross-rank estimate
    bco_delta                       bco's reward shift δ, the running mean of [β·a; β·b] kept by
                                    the trainer (float or 0-d tensor); None uses this batch's
                                    mean. bco returns the batch mean as "bco/batch_reward_mean"
                                    for the trainer to update its running mean.

    Unpaired losses (kto, bco) read the chosen side as desirable examples and the rejected side
    as undesirable ones; each per-pair loss is the mean of its two examples' losses, so the batch
    mean is the mean over all 2B examples.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_len: Tensor | None = None
    rejected_len: Tensor | None = None
    chosen_score: Tensor | None = None
    rejected_score: Tensor | None = None
    preference_prob: Tensor | None = None
    chosen_wpo_logw: Tensor | None = None
    rejected_wpo_logw: Tensor | None = None
    policy_chosen_prefix: Tensor | None = None
    policy_rejected_prefix: Tensor | None = None
    ref_chosen_prefix: Tensor | None = None
    ref_rejected_prefix: Tensor | None = None
    chosen_winrate: Tensor | None = None
    rejected_winrate: Tensor | None = None
    kl_policy: Tensor | None = None
    kl_ref: Tensor | None = None
    bco_delta: Tensor | float | None = None

    def validate(self) -> None:
        """Raise LossInputError unless the per-pair fields are 1-D tensors of the same length."""
        if not isinstance(self.policy_chosen, Tensor) or self.policy_chosen.dim() != 1:
            raise LossInputError("policy_chosen must be a 1-D tensor (one log-prob per pair)")
        size = self.policy_chosen.shape
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in _FREE_SHAPE_FIELDS:
                continue
            if not isinstance(value, Tensor) or value.shape != size:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise LossInputError(
                    f"{f.name} must be a tensor of shape {tuple(size)}, got {shape}"
                )
        if (self.kl_policy is None) != (self.kl_ref is None):
            raise LossInputError("kl_policy and kl_ref must be given together")
        if self.kl_policy is not None and (
            self.kl_policy.dim() != 1 or self.kl_policy.shape != self.kl_ref.shape
        ):
            raise LossInputError("kl_policy and kl_ref must be 1-D tensors of the same length")
        if isinstance(self.bco_delta, Tensor) and self.bco_delta.numel() != 1:
            raise LossInputError("bco_delta must be a scalar")

    def upcast(self) -> PairLogps:
        """A copy with every tensor at least float32 (bf16/fp16 → fp32, fp64 kept)."""

        def up(v: object) -> object:
            if not isinstance(v, Tensor):
                return v
            return v.to(
                torch.promote_types(v.dtype, torch.float32)
                if v.is_floating_point()
                else torch.float32
            )

        return dataclasses.replace(
            self, **{f.name: up(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )


_FREE_SHAPE_FIELDS = frozenset({"kl_policy", "kl_ref", "bco_delta"})


@dataclass
class LossOutput:
    """Per-pair losses [B], detached implicit rewards [B], float metrics, per-pair weights [B].

    A pair with weight 0 is excluded from the batch loss; None means every pair counts.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    weights: Tensor | None = None

    def mean(self) -> Tensor:
        """Σ w·ℓ / max(Σ w, 1): the batch loss, counting only pairs with weight > 0."""
        if self.weights is None:
            return self.losses.mean()
        return (self.losses * self.weights).sum() / self.weights.sum().clamp(min=1.0)


# Helpers shared by the losses ------------------------------------------------------------------


def need(batch: PairLogps, *names: str) -> list[Tensor]:
    """The named batch fields, or a LossInputError naming the ones that are None."""
    missing = [n for n in names if getattr(batch, n) is None]
    if missing:
        raise LossInputError(f"needs batch field(s) {', '.join(missing)}, which are None")
    return [getattr(batch, n) for n in names]


def check(ok: bool, message: str) -> None:
    """Raise LossInputError(message) unless ok."""
    if not ok:
        raise LossInputError(message)


def log_ratios(batch: PairLogps) -> tuple[Tensor, Tensor]:
    """a = pw − rw, b = pl − rl."""
    rw, rl = need(batch, "ref_chosen", "ref_rejected")
    return batch.policy_chosen - rw, batch.policy_rejected - rl


def per_token(x: Tensor, length: Tensor) -> Tensor:
    """x / max(|y|, 1)."""
    return x / length.clamp(min=1.0)


def lengths(batch: PairLogps) -> tuple[Tensor, Tensor]:
    """|y_w|, |y_l|."""
    lw, ll = need(batch, "chosen_len", "rejected_len")
    return lw, ll


def nll_token_mean(batch: PairLogps) -> Tensor:
    """−Σ_batch pw / Σ_batch |y_w|: the token-mean NLL of all chosen responses (a scalar)."""
    lw, _ = lengths(batch)
    return -batch.policy_chosen.sum() / lw.sum().clamp(min=1.0)


def logistic(x: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """−(1−ε)·logσ(x) − ε·logσ(−x)."""
    loss = -F.logsigmoid(x)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-x)
    return loss


def rewards(beta: float, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    """β·chosen, β·rejected, detached."""
    return (beta * chosen).detach(), (beta * rejected).detach()


def output(
    losses: Tensor,
    beta: float,
    chosen: Tensor,
    rejected: Tensor,
    metrics: dict[str, float] | None = None,
    weights: Tensor | None = None,
) -> LossOutput:
    """LossOutput with rewards β·chosen, β·rejected, the loss's own metrics and weights."""
    return LossOutput(
        losses, *rewards(beta, chosen, rejected), metrics=metrics or {}, weights=weights
    )


def scalar(x: Tensor) -> float:
    """A 0-d tensor as a python float (detached)."""
    return float(x.detach().float())
