"""Plot loss and dL/dh against the logit gap h for DPO (sigmoid), IPO and the principled loss.

Usage: python bench/plot_losses.py [out.png]   (default bench/losses.png)
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from workers.losses import PairLogps, compute_loss

BETA = 0.1
TARGET_PROB = 0.75  # principled default target: h* = logit(0.75)/β ≈ 11
CURVES = [
    ("DPO (sigmoid)", "sigmoid", {}),
    ("IPO", "ipo", {}),
    ("principled", "principled", {"target_prob": TARGET_PROB}),
    ("principled, squared", "principled", {"target_prob": TARGET_PROB, "shape": "squared"}),
]


def loss_and_grad(
    name: str, h: torch.Tensor, **params: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and dL/dh per pair, for a = h, b = 0 and one-token responses (so IPO's ÷|y| is 1)."""
    h = h.clone().requires_grad_()
    zero, one = torch.zeros_like(h), torch.ones_like(h)
    out = compute_loss(name, PairLogps(h, zero, zero, zero, one, one), beta=BETA, **params)
    (grad,) = torch.autograd.grad(out.losses.sum(), h)
    return out.losses.detach(), grad


def main(path: str) -> None:
    h = torch.linspace(-30.0, 80.0, 2201, dtype=torch.float64)
    h_star = torch.logit(torch.tensor(TARGET_PROB)).item() / BETA
    fig, (ax_loss, ax_grad) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for label, name, params in CURVES:
        loss, grad = loss_and_grad(name, h, **params)
        style = "--" if params.get("shape") == "squared" else "-"
        ax_loss.plot(h, loss, style, label=label)
        ax_grad.plot(h, grad, style, label=label)
    for ax in (ax_loss, ax_grad):
        ax.axvline(h_star, color="grey", lw=0.8, ls=":")
        ax.axvline(1 / (2 * BETA), color="grey", lw=0.8, ls="-.")
        ax.axhline(0.0, color="black", lw=0.5)
        ax.grid(alpha=0.3)
    ax_loss.set_ylim(-0.6, 4.0)
    ax_grad.set_ylim(-0.25, 0.25)
    ax_loss.set_ylabel("loss")
    ax_grad.set_ylabel("dL/dh")
    ax_grad.set_xlabel("h = (pw − rw) − (pl − rl)")
    ax_loss.set_title(
        f"β = {BETA}: principled target h* = logit({TARGET_PROB})/β ≈ {h_star:.1f} (dotted), "
        f"IPO target 1/(2β) = {1 / (2 * BETA):g} (dash-dot); IPO leaves the axes quadratically",
        fontsize=8,
    )
    ax_loss.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/losses.png")
