"""Reference-based DPO variants outside TRL's loss_type list; a = pw − rw, b = pl − rl, h = a − b"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .core import (
    LossOutput,
    PairLogps,
    lengths,
    log_ratios,
    logistic,
    need,
    output,
    per_token,
    scalar,
)

Divergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


def fdpo(
    batch: PairLogps,
    *,
    beta: float = 0.1,
    divergence: Divergence = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """f-DPO: ℓ = −logσ(β·(g(a) − g(b))) with g from the divergence (TRL main):
    reverse_kl g(a) = a; forward_kl g(a) = −e^{min(−a, 80)}; js_divergence g(a) = logσ(a);
    alpha_divergence (α = f_alpha_divergence_coef) g(a) = e^{min((α−1)·a, 80)}/(α−1),
    reverse_kl's g at α = 1.

    Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints, arXiv 2309.16240.
    """
    a, b = log_ratios(batch)
    g = _divergence_score(divergence, f_alpha_divergence_coef)
    return output(logistic(beta * (g(a) - g(b))), beta, a, b)


def _divergence_score(divergence: Divergence, alpha: float) -> Callable[[Tensor], Tensor]:
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return lambda r: r
    if divergence == "js_divergence":
        return F.logsigmoid
    # forward KL is the α = 0 case of the α-divergence score, −e^{−a}; both get the clamp at 80
    coef = 0.0 if divergence == "forward_kl" else alpha
    return lambda r: torch.exp(((coef - 1.0) * r).clamp(max=80.0)) / (coef - 1.0)


def dpop(batch: PairLogps, *, beta: float = 0.1, dpop_lambda: float = 50.0) -> LossOutput:
    """DPO-Positive: ℓ = −logσ(β·(h − λ·max(0, rw − pw))).

    Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive, arXiv 2402.13228.
    """
    a, b = log_ratios(batch)
    penalty = torch.relu(-a)  # max(0, rw − pw)
    return output(
        logistic(beta * (a - b - dpop_lambda * penalty)),
        beta,
        a,
        b,
        {"dpop/penalty": scalar(penalty.mean())},
    )


def npo(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """NPO on the rejected (forget) response: ℓ = −(2/β)·logσ(−β·b).

    Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning,
    arXiv 2404.05868.
    """
    a, b = log_ratios(batch)
    return output((2.0 / beta) * logistic(-beta * b), beta, a, b)


def wpo(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """WPO: ℓ = −w_w·w_l·logσ(β·h), w = exp(chosen_/rejected_wpo_logw), no gradient through w,
    no clamp.

    WPO: Enhancing RLHF with Weighted Preference Optimization, arXiv 2406.11827.
    """
    a, b = log_ratios(batch)
    lw, ll = need(batch, "chosen_wpo_logw", "rejected_wpo_logw")
    weight = torch.exp(lw + ll).detach()
    return output(
        weight * logistic(beta * (a - b)), beta, a, b, {"wpo/weight_mean": scalar(weight.mean())}
    )


def ld_dpo(batch: PairLogps, *, beta: float = 0.1, ld_alpha: float = 0.5) -> LossOutput:
    """LD-DPO: each log-prob, policy and reference, becomes prefix + α·(total − prefix), the
    prefix being the first min(|y_w|, |y_l|) tokens; then ℓ = −logσ(β·h) on those.

    Length Desensitization in Direct Preference Optimization, arXiv 2409.06411.
    """
    pwp, plp, rwp, rlp = need(
        batch,
        "policy_chosen_prefix",
        "policy_rejected_prefix",
        "ref_chosen_prefix",
        "ref_rejected_prefix",
    )
    rw, rl = need(batch, "ref_chosen", "ref_rejected")

    def weighted(total: Tensor, prefix: Tensor) -> Tensor:
        return prefix + ld_alpha * (total - prefix)

    a = weighted(batch.policy_chosen, pwp) - weighted(rw, rwp)
    b = weighted(batch.policy_rejected, plp) - weighted(rl, rlp)
    return output(logistic(beta * (a - b)), beta, a, b)


def sppo(batch: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """SPPO (soft win rates), η = 1/β: ℓ = (a − η·(P̂_w − ½))² + (b − η·(P̂_l − ½))².

    Self-Play Preference Optimization for Language Model Alignment, arXiv 2405.00675.
    """
    a, b = log_ratios(batch)
    pw_hat, pl_hat = need(batch, "chosen_winrate", "rejected_winrate")
    losses = (a - (pw_hat - 0.5) / beta) ** 2 + (b - (pl_hat - 0.5) / beta) ** 2
    return output(losses, beta, a, b)


def rpo(batch: PairLogps, *, beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """RPO (DPO + length-normalised NLL of the winner): ℓ = −logσ(β·h) + α·(−pw/|y_w|).

    Iterative Reasoning Preference Optimization, arXiv 2404.19733.
    """
    a, b = log_ratios(batch)
    lw, _ = lengths(batch)
    nll = -per_token(batch.policy_chosen, lw)
    return output(
        logistic(beta * (a - b)) + alpha * nll, beta, a, b, {"rpo/nll": scalar(nll.mean())}
    )
