"""TRL DPOTrainer `loss_type`s, TRL main semantics; a = pw − rw, b = pl − rl, h = a − b (sums)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .core import (
    LossOutput,
    PairLogps,
    check,
    lengths,
    log_ratios,
    logistic,
    nll_token_mean,
    output,
    per_token,
    scalar,
)


def sigmoid(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """DPO: ℓ = −logσ(β·h).

    Direct Preference Optimization: Your Language Model is Secretly a Reward Model,
    arXiv 2305.18290.
    """
    a, b = log_ratios(batch)
    return output(logistic(beta * (a - b)), beta, a, b)


def hinge(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """SLiC / RSO hinge-norm: ℓ = relu(1 − β·h).

    SLiC-HF: Sequence Likelihood Calibration with Human Feedback, arXiv 2305.10425.
    """
    a, b = log_ratios(batch)
    return output(torch.relu(1.0 - beta * (a - b)), beta, a, b)


def ipo(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """IPO, length-averaged: ℓ = (a/max(|y_w|,1) − b/max(|y_l|,1) − 1/(2β))².

    A General Theoretical Paradigm to Understand Learning from Human Preferences, arXiv 2310.12036.
    """
    a, b = log_ratios(batch)
    lw, ll = lengths(batch)
    return output((per_token(a, lw) - per_token(b, ll) - 1.0 / (2.0 * beta)) ** 2, beta, a, b)


def exo_pair(batch: PairLogps, *, beta: float = 0.1, label_smoothing: float = 1e-3) -> LossOutput:
    """EXO (pairwise): with q_w = σ(βh), q_l = σ(−βh),
    ℓ = q_w·(logσ(βh) − log(1−ε)) + q_l·(logσ(−βh) − log ε), 0 < ε < 1.

    Towards Efficient and Exact Optimization of Language Model Alignment, arXiv 2402.00856.
    """
    check(
        0.0 < label_smoothing < 1.0,
        f"exo_pair needs 0 < label_smoothing < 1, got {label_smoothing}",
    )
    a, b = log_ratios(batch)
    z = beta * (a - b)
    chosen = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
    rejected = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing))
    return output(chosen + rejected, beta, a, b)


def nca_pair(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """NCA (pairwise): ℓ = −logσ(βa) − ½·logσ(−βa) − ½·logσ(−βb).

    Noise Contrastive Alignment of Language Models with Explicit Rewards, arXiv 2402.05369.
    """
    a, b = log_ratios(batch)
    losses = -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)
    return output(losses, beta, a, b)


def robust(batch: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO: ℓ = [−(1−ε)·logσ(βh) + ε·logσ(−βh)] / (1 − 2ε), 0 ≤ ε < ½.

    Provably Robust DPO: Aligning Language Models with Noisy Feedback, arXiv 2403.00409.
    """
    eps = label_smoothing
    check(0.0 <= eps < 0.5, f"robust needs 0 <= label_smoothing < 0.5, got {eps}")
    a, b = log_ratios(batch)
    z = beta * (a - b)
    losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return output(losses, beta, a, b)


def bco_pair(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """BCO (pairwise, TRL main, no reward shift): ℓ = −logσ(βa) − logσ(−βb).

    Binary Classifier Optimization for Large Language Model Alignment, arXiv 2404.04656.
    """
    a, b = log_ratios(batch)
    return output(logistic(beta * a) + logistic(-beta * b), beta, a, b)


def sppo_hard(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """SPPO with hard labels: ℓ = (a − 1/(2β))² + (b + 1/(2β))².

    Self-Play Preference Optimization for Language Model Alignment, arXiv 2405.00675.
    """
    a, b = log_ratios(batch)
    return output((a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2, beta, a, b)


def aot(batch: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT (paired): δ = sort_batch(pw − pl) − sort_batch(rw − rl),
    ℓ = −(1−ε)·logσ(βδ) − ε·logσ(−βδ), indexed by sorted position, not by pair.

    Distributional Preference Alignment of LLMs via Optimal Transport, arXiv 2406.05882.
    """
    a, b = log_ratios(batch)
    policy = _sorted(batch.policy_chosen - batch.policy_rejected)
    reference = _sorted(batch.ref_chosen - batch.ref_rejected)
    return output(logistic(beta * (policy - reference), label_smoothing), beta, a, b)


def aot_unpaired(
    batch: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0
) -> LossOutput:
    """AOT (unpaired): δ = sort_batch(a) − sort_batch(b),
    ℓ = −(1−ε)·logσ(βδ) − ε·logσ(−βδ), indexed by sorted position, not by pair.

    Distributional Preference Alignment of LLMs via Optimal Transport, arXiv 2406.05882.
    """
    a, b = log_ratios(batch)
    return output(logistic(beta * (_sorted(a) - _sorted(b)), label_smoothing), beta, a, b)


def apo_zero(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-zero: ℓ = (1 − σ(βa)) + σ(βb).

    Anchored Preference Optimization and Contrastive Revisions, arXiv 2408.06266.
    """
    a, b = log_ratios(batch)
    return output(1.0 - torch.sigmoid(beta * a) + torch.sigmoid(beta * b), beta, a, b)


def apo_down(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """APO-down: ℓ = σ(βa) + (1 − σ(βh)).

    Anchored Preference Optimization and Contrastive Revisions, arXiv 2408.06266.
    """
    a, b = log_ratios(batch)
    return output(torch.sigmoid(beta * a) + 1.0 - torch.sigmoid(beta * (a - b)), beta, a, b)


def discopop(batch: PairLogps, *, beta: float = 0.1, discopop_tau: float = 0.05) -> LossOutput:
    """DiscoPOP / LRML: z = βh, m = σ(z/τ), ℓ = (1 − m)·(−logσ(z)) + m·e^{−z}.

    Discovering Preference Optimization Algorithms with and for Large Language Models,
    arXiv 2406.08414.
    """
    check(discopop_tau > 0.0, f"discopop needs discopop_tau > 0, got {discopop_tau}")
    a, b = log_ratios(batch)
    z = beta * (a - b)
    logistic_part = torch.sigmoid(-z / discopop_tau) * logistic(z)
    exp_part = torch.exp(F.logsigmoid(z / discopop_tau) - z)  # m·e^{−z} with no 0·inf at z ≪ 0
    return output(logistic_part + exp_part, beta, a, b)


def sft(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """SFT: ℓ = −Σ_batch pw / Σ_batch |y_w| (token-mean NLL of the chosen responses) for every
    pair; β only scales the logged rewards (β·a, β·b, or β·pw, β·pl without a reference).

    TRL's `sft` term, as used in RPO-style mixtures: Iterative Reasoning Preference Optimization,
    arXiv 2404.19733.
    """
    nll = nll_token_mean(batch)
    if batch.ref_chosen is None or batch.ref_rejected is None:
        chosen, rejected = batch.policy_chosen, batch.policy_rejected
    else:
        chosen, rejected = log_ratios(batch)
    return output(
        nll.expand_as(batch.policy_chosen), beta, chosen, rejected, {"sft/nll": scalar(nll)}
    )


def sigmoid_norm(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Length-normalised DPO: ℓ = −logσ(β·(a/|y_w| − b/|y_l|)).

    SimPO: Simple Preference Optimization with a Reference-Free Reward, arXiv 2405.14734
    ("DPO w/ LN"); Tülu 3: Pushing Frontiers in Open Language Model Post-Training,
    arXiv 2411.15124.
    """
    a, b = log_ratios(batch)
    lw, ll = lengths(batch)
    return output(logistic(beta * (per_token(a, lw) - per_token(b, ll))), beta, a, b)


def _sorted(x: Tensor) -> Tensor:
    return torch.sort(x, dim=0).values
