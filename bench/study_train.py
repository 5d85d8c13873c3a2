"""Study training: the trainer's micro-step without Ray or DeepSpeed, and the logit-gap metrics.

One optimizer step = `workers.train_step.policy_pair_logps` + `workers.losses.compute_loss`
(what `pair_loss` does) on a `ResponseLogps`-wrapped HF model, AdamW with the trainer's betas,
`workers.recipe.options.lr_lambda` warmup + schedule, gradient clipping as DeepSpeed's
`gradient_clipping`. Metrics are measured on the forward that precedes each update, so the
record of step k describes the policy after k updates (step 0: policy == reference, h = 0).

The logit gap is the spec's h = a − b = (pw − rw) − (pl − rl), in log-prob units, for every
loss (also the reference-free SimPO, whose reference log-probs are still known). Its target
h* is taken from the principled loss itself (`compute_loss("principled", ...)`), so the
numbers use exactly the library's definition (clamped at min_target, reversed/tied pairs left
out).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.study_data import Row, columns
from workers.losses import PairLogps, compute_loss
from workers.recipe.options import lr_lambda
from workers.train_step import policy_pair_logps, rows_to_pairs


@dataclass(frozen=True)
class Arm:
    """One loss configuration of the study."""

    name: str
    loss: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainSettings:
    """Identical for every arm: the budget of the comparison."""

    steps: int
    batch_size: int = 32
    learning_rate: float = 5e-5
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0


def _detached(logps: PairLogps) -> PairLogps:
    fields = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in vars(logps).items()}
    return PairLogps(**fields)


@torch.no_grad()
def gap_metrics(logps: PairLogps, beta: float, target: str = "scores") -> dict[str, float]:
    """h = a − b (mean, population std), its distance to the principled target h* of mode
    `target`, log-probs and log-ratios of chosen and rejected, reward accuracy (a > b) and
    ranking accuracy (pw > pl, and per token)."""
    d = _detached(logps)
    a, b = d.policy_chosen - d.ref_chosen, d.policy_rejected - d.ref_rejected
    h = (a - b).double()
    m = compute_loss("principled", d, beta=beta, target=target).metrics
    return {
        "h_mean": float(h.mean()),
        "h_std": float(h.std(unbiased=False)),
        "h_star_mean": m["principled/target_mean"],
        "gap_to_target": m["principled/gap_to_target"],
        "frac_past_target": m["principled/frac_past_target"],
        "logp_chosen": m["logps/chosen"],
        "logp_rejected": m["logps/rejected"],
        "logratio_chosen": float(a.mean()),
        "logratio_rejected": float(b.mean()),
        "reward_acc": m["rewards/accuracies"],
        "ranking_acc": m["ranking/accuracy"],
        "ranking_acc_len_norm": m["ranking/accuracy_len_norm"],
    }


def concat_logps(parts: Sequence[PairLogps]) -> PairLogps:
    """PairLogps of several batches as one (fields absent in any part are left out)."""
    names = [k for k, v in vars(parts[0]).items()
             if isinstance(v, torch.Tensor) and all(isinstance(vars(p)[k], torch.Tensor) for p in parts)]
    return PairLogps(**{k: torch.cat([vars(p)[k].detach() for p in parts]) for k in names})


@torch.no_grad()
def pair_logps(module: torch.nn.Module, rows: Sequence[Row], pad_id: int,
               batch_size: int = 64) -> PairLogps:
    """Policy log-probs (plus the rows' reference log-probs and scores) of all `rows`."""
    parts = [policy_pair_logps(module, rows_to_pairs(columns(rows[i:i + batch_size]), pad_id))
             for i in range(0, len(rows), batch_size)]
    return concat_logps(parts)


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """Row indices of each step's batch: a seeded shuffle per epoch, last partial batch dropped."""
    if n < batch_size:
        raise ValueError(f"{n} pairs are fewer than one batch of {batch_size}")
    rng = random.Random(seed)
    done = 0
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            yield order[start:start + batch_size]
            done += 1


def make_optimizer(module: torch.nn.Module, s: TrainSettings
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(module.parameters(), lr=s.learning_rate, betas=s.adam_betas,
                            weight_decay=s.weight_decay)
    warmup = round(s.warmup_ratio * s.steps)  # as pipeline.stages.train
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.schedule, warmup, s.steps))


def train_steps(module: torch.nn.Module, rows: Sequence[Row], arm: Arm, s: TrainSettings,
                seed: int, pad_id: int, beta: float) -> Iterator[dict[str, float]]:
    """Train `module` (a `ResponseLogps`) in place for `s.steps` steps; yield each step's record:
    loss, lr, grad norm, the batch's gap metrics (against the scores target) and the loss's
    own metrics (prefixed `loss/`)."""
    opt, sched = make_optimizer(module, s)
    module.train()
    for step, idx in enumerate(batch_order(len(rows), s.batch_size, s.steps, seed)):
        logps = policy_pair_logps(module, rows_to_pairs(columns([rows[i] for i in idx]), pad_id))
        out = compute_loss(arm.loss, logps, **arm.params)
        loss = out.mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(),
                                                   s.grad_clip if s.grad_clip > 0 else float("inf"))
        lr = sched.get_last_lr()[0]
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        yield {"step": step, "loss": float(loss.detach()), "lr": lr, "grad_norm": float(grad_norm),
               **gap_metrics(logps, beta),
               **{f"loss/{k}": v for k, v in out.metrics.items()}}
    module.eval()
