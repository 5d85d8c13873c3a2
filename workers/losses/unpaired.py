"""Unpaired losses: the chosen side holds desirable examples, the rejected side undesirable ones
(see PairLogps); each per-pair loss is the mean of its two examples' losses.
a = pw − rw, b = pl − rl.
"""

from __future__ import annotations

import torch

from .core import LossOutput, PairLogps, log_ratios, logistic, need, output, scalar


def kto(
    batch: PairLogps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO: z0 = max(0, mean(kl_policy − kl_ref)) (no gradient);
    ℓ = ½·[λ_D·(1 − σ(β(a − z0))) + λ_U·(1 − σ(β(z0 − b)))].

    KTO: Model Alignment as Prospect Theoretic Optimization, arXiv 2402.01306.
    """
    a, b = log_ratios(batch)
    kl_policy, kl_ref = need(batch, "kl_policy", "kl_ref")
    z0 = (kl_policy - kl_ref).mean().clamp(min=0.0).detach()
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (a - z0)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - b)))
    return output(0.5 * (desirable + undesirable), beta, a, b, {"kto/kl": scalar(z0)})


def bco(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """BCO: δ = bco_delta (the trainer's running mean of [β·a; β·b]; this batch's mean when None);
    ℓ = ½·[−logσ(βa − δ) − logσ(−(βb − δ))].

    Binary Classifier Optimization for Large Language Model Alignment, arXiv 2404.04656.
    """
    a, b = log_ratios(batch)
    batch_mean = (beta * torch.cat([a, b])).mean().detach()
    given = batch.bco_delta
    delta = (
        batch_mean
        if given is None
        else torch.as_tensor(given, dtype=a.dtype, device=a.device).detach().reshape(())
    )
    losses = 0.5 * (logistic(beta * a - delta) + logistic(-(beta * b - delta)))
    metrics = {"bco/batch_reward_mean": scalar(batch_mean), "bco/delta": scalar(delta)}
    return output(losses, beta, a, b, metrics)
