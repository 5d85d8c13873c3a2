"""Reference-free losses (the ref fields may be None); pw, pl summed, p̄ = p/|y| per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .core import (
    LossOutput,
    PairLogps,
    lengths,
    logistic,
    nll_token_mean,
    output,
    per_token,
    scalar,
)


def simpo(batch: PairLogps, *, beta: float = 2.0, gamma: float = 1.0) -> LossOutput:
    """SimPO: ℓ = −logσ(β·p̄w − β·p̄l − γ); rewards β·p̄w, β·p̄l.

    SimPO: Simple Preference Optimization with a Reference-Free Reward, arXiv 2405.14734.
    """
    lw, ll = lengths(batch)
    mw, ml = per_token(batch.policy_chosen, lw), per_token(batch.policy_rejected, ll)
    return output(logistic(beta * (mw - ml) - gamma), beta, mw, ml)


def cpo(
    batch: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0, cpo_alpha: float = 1.0
) -> LossOutput:
    """CPO: ℓ = −(1−ε)·logσ(β·(pw − pl)) − ε·logσ(−β·(pw − pl)) + cpo_alpha·NLL,
    NLL = −Σ_batch pw / Σ_batch |y_w|; rewards β·pw, β·pl.

    Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine
    Translation, arXiv 2401.08417.
    """
    pw, pl = batch.policy_chosen, batch.policy_rejected
    nll = nll_token_mean(batch)
    losses = logistic(beta * (pw - pl), label_smoothing) + cpo_alpha * nll
    return output(losses, beta, pw, pl, {"cpo/nll": scalar(nll)})


def orpo(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """ORPO: log_odds = (p̄w − p̄l) − (log(1 − e^{p̄w}) − log(1 − e^{p̄l})),
    ℓ = NLL − β·logσ(log_odds), NLL = −Σ_batch pw / Σ_batch |y_w|; rewards β·p̄w, β·p̄l.

    ORPO: Monolithic Preference Optimization without Reference Model, arXiv 2403.07691.
    """
    lw, ll = lengths(batch)
    mw, ml = per_token(batch.policy_chosen, lw), per_token(batch.policy_rejected, ll)
    log_odds = (mw - ml) - (_log1mexp(mw) - _log1mexp(ml))
    ratio = F.logsigmoid(log_odds)
    nll = nll_token_mean(batch)
    metrics = {
        "orpo/log_odds_ratio": scalar(ratio.mean()),
        "orpo/log_odds_chosen": scalar(log_odds.mean()),
        "orpo/nll": scalar(nll),
    }
    return output(nll - beta * ratio, beta, mw, ml, metrics)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x < 0; x is capped at −1e-6 so a mean log-prob of exactly 0 stays finite."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
