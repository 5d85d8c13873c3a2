"""The principled loss: minimised at the RLHF optimum's finite logit gap h* = (r_w − r_l)/β."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .core import LossOutput, PairLogps, check, log_ratios, need, output, scalar

TargetMode = Literal["auto", "scores", "bradley_terry", "constant"]


def principled(
    batch: PairLogps,
    *,
    beta: float = 0.1,
    target: TargetMode = "auto",
    reward_scale: float = 1.0,
    target_prob: float = 0.75,
    target_margin: float = 10.0,
    alpha: float = 0.0,
    negative_side: Literal["linear", "exp"] = "linear",
    min_target: float = 0.5,
    shape: Literal["natural", "squared"] = "natural",
) -> LossOutput:
    """Principled loss, with a = pw − rw, b = pl − rl, h = a − b, z = h/h*:
    ℓ = core(z) + α·softplus(β·b), core(z) = −z·e^{−z} for z ≥ 0; for z < 0, −z (linear)
    or −z·e^{−z} (exp). Shape "squared": core = (h − h*)²/(2h*).
    Target h*: scores (s_w − s_l)·reward_scale/β; bradley_terry logit(p)/β with
    p = preference_prob, else target_prob; constant target_margin; auto = scores when both score
    fields are present, else bradley_terry. h* = max(raw h*, min_target); a pair whose raw h* is
    ≤ 0 or not finite gets weight 0 and loss 0.

    A Principled Loss Function for Direct Language Model Alignment, arXiv 2508.07137.
    """
    check(min_target > 0.0, f"principled needs min_target > 0, got {min_target}")
    a, b = log_ratios(batch)
    h = a - b
    raw = _raw_target(batch, target, beta, reward_scale, target_prob, target_margin)
    valid = torch.isfinite(raw) & (raw > 0)
    h_star = torch.where(valid, raw.clamp(min=min_target), torch.ones_like(raw))
    if shape == "squared":
        core = (h - h_star) ** 2 / (2.0 * h_star)
    else:
        core = _core(h / h_star, negative_side)
    losses = torch.where(valid, core + alpha * F.softplus(beta * b), torch.zeros_like(core))
    return output(losses, beta, a, b, _metrics(h, h_star, valid), weights=valid.to(h.dtype))


def _raw_target(
    batch: PairLogps,
    mode: TargetMode,
    beta: float,
    reward_scale: float,
    target_prob: float,
    target_margin: float,
) -> Tensor:
    """h* before clamping, per pair."""
    like = batch.policy_chosen.detach()
    if mode == "auto":
        mode = (
            "scores"
            if batch.chosen_score is not None and batch.rejected_score is not None
            else "bradley_terry"
        )
    if mode == "scores":
        sw, sl = need(batch, "chosen_score", "rejected_score")
        return ((sw - sl) * reward_scale / beta).detach()
    if mode == "bradley_terry":
        check(0.5 < target_prob < 1.0, f"principled needs 0.5 < target_prob < 1, got {target_prob}")
        p = (
            batch.preference_prob
            if batch.preference_prob is not None
            else torch.full_like(like, target_prob)
        )
        return torch.logit(p.detach()) / beta
    check(target_margin > 0.0, f"principled needs target_margin > 0, got {target_margin}")
    return torch.full_like(like, target_margin)


def _core(z: Tensor, negative_side: Literal["linear", "exp"]) -> Tensor:
    """−z·e^{−z} for z ≥ 0; the negative side is −z (linear) or −z·e^{−z} (exp)."""
    if negative_side == "exp":
        return -z * torch.exp(-z)
    positive = z.clamp(min=0.0)  # each branch sees only its own half-line, so neither can overflow
    negative = z.clamp(max=0.0)
    return torch.where(z >= 0, -positive * torch.exp(-positive), -negative)


def _metrics(h: Tensor, h_star: Tensor, valid: Tensor) -> dict[str, float]:
    """Means over the valid pairs (0.0 when there are none) and the count of invalid pairs."""
    h, h_star = h.detach()[valid], h_star[valid]

    def mean(x: Tensor) -> float:
        return scalar(x.float().mean()) if x.numel() else 0.0

    return {
        "principled/target_mean": mean(h_star),
        "principled/gap_to_target": mean((h - h_star).abs()),
        "principled/frac_past_target": mean(h > h_star),
        "principled/invalid_pairs": float((~valid).sum()),
    }
