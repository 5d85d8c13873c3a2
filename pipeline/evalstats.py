"""Evaluation metrics as pure functions, and their confidence intervals.

The per-unit metrics (a win with ties half, each sample's win rate among its prompt's
samples, the sequence-level KL estimate, a pair's margin and accuracies) are shared by the
evaluate stage, the pair stage and bench/.

Intervals: a seeded percentile bootstrap over prompts/pairs.

Every metric of the evaluate stage is a mean over held-out prompts (gold reward, win rate,
KL) or pairs (reward margin, accuracies, loss). Its 95% interval resamples those prompts
with replacement (`RESAMPLES` times, a fixed seed, so a rerun prints the same interval) and
takes the 2.5 and 97.5 percentiles of the resampled means. A change (policy − reference, or
this round − the previous one) is tested *paired*: the same prompts are resampled for both
sides, the interval is that of the mean per-prompt difference, and the change is
significant when that interval excludes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its confidence interval [low, high]."""

    value: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def excludes(self, x: float) -> bool:
        """Is x outside the interval (the change against x significant)?"""
        return x < self.low or x > self.high

    def as_metrics(self, key: str) -> dict[str, float]:
        """{key: value, key_low: low, key_high: high} (flat floats, for metrics.jsonl)."""
        return {key: self.value, f"{key}_low": self.low, f"{key}_high": self.high}


def _array(x: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name}: need a non-empty 1-d sample, got shape {a.shape}")
    return a


def bootstrap_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[resamples, n] indices drawn with replacement from range(n), reproducible by seed."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def mean_ci(x: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
            level: float = LEVEL) -> Interval:
    """Mean of x and its percentile-bootstrap interval."""
    a = _array(x, "mean_ci")
    means = a[bootstrap_indices(a.size, resamples, seed)].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(a.mean()), float(low), float(high))


def paired_diff_ci(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES,
                   seed: int = SEED, level: float = LEVEL) -> Interval:
    """Mean of a − b over the same units (prompts) and its paired-bootstrap interval."""
    x, y = _array(a, "paired_diff_ci a"), _array(b, "paired_diff_ci b")
    if x.shape != y.shape:
        raise ValueError(f"paired_diff_ci: samples differ in size ({x.size} vs {y.size})")
    return mean_ci(x - y, resamples, seed, level)


def wins(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Per-prompt win of a over b: 1, 0.5 for a tie, 0."""
    x, y = _array(a, "wins a"), _array(b, "wins b")
    if x.shape != y.shape:
        raise ValueError(f"wins: samples differ in size ({x.size} vs {y.size})")
    return (x > y) + 0.5 * (x == y)


def win_rates(scores: Sequence[float]) -> list[float]:
    """Each sample's P̂(y_i ≻ the prompt's other samples): wins + ½ ties over the n − 1 others
    (0.5 for a lone sample)."""
    n = len(scores)
    if n < 2:
        return [0.5] * n
    x = _array(scores, "win_rates scores")
    beats = (x[:, None] > x[None, :]) + 0.5 * (x[:, None] == x[None, :])
    return [float(v) for v in (beats.sum(1) - 0.5) / (n - 1)]  # minus the tie with itself


def sequence_kl(policy_logp: Sequence[float], reference_logp: Sequence[float]) -> np.ndarray:
    """Per sample y ~ π: log π(y) − log π_ref(y) (summed over its tokens); its mean estimates
    KL(π ‖ π_ref) at the sequence level."""
    x, y = _array(policy_logp, "sequence_kl policy"), _array(reference_logp, "sequence_kl reference")
    if x.shape != y.shape:
        raise ValueError(f"sequence_kl: samples differ in size ({x.size} vs {y.size})")
    return x - y


def pair_outcomes(chosen_reward: Sequence[float], rejected_reward: Sequence[float],
                  policy_chosen: Sequence[float], policy_rejected: Sequence[float],
                  ref_chosen: Sequence[float], ref_rejected: Sequence[float]) -> dict[str, np.ndarray]:
    """Per pair: the implicit reward margin, reward accuracy (chosen reward above rejected),
    and the ranking of the policy and of the reference alone (chosen log-prob above rejected)."""
    cr, rr = _array(chosen_reward, "chosen_reward"), _array(rejected_reward, "rejected_reward")
    pc, pr = _array(policy_chosen, "policy_chosen"), _array(policy_rejected, "policy_rejected")
    rc, rj = _array(ref_chosen, "ref_chosen"), _array(ref_rejected, "ref_rejected")
    return {"margin": cr - rr, "reward_accuracy": (cr > rr).astype(float),
            "ranking": (pc > pr).astype(float), "ref_ranking": (rc > rj).astype(float)}


def win_rate_ci(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES,
                seed: int = SEED, level: float = LEVEL) -> Interval:
    """Win rate of a over b (ties count half) and its interval; better than chance when the
    interval excludes 0.5."""
    return mean_ci(wins(a, b), resamples, seed, level)


def mark(ci: Interval, null: float = 0.0) -> str:
    """'*' when the interval excludes `null` (a significant change), else ''."""
    return "*" if ci.excludes(null) else ""


def unit_keys(file: str, columns: dict[str, list]) -> list:
    """What pairs the units of two evaluations of the same eval data (two rounds, two runs):
    a pair (pairs.parquet) by its id; a prompt (samples.parquet) by its place in evaluate's
    order and its text, since two multi-turn prompts may end in the same turn's text."""
    if file == "pairs":
        return list(columns["id"])
    return list(enumerate(columns["prompt"]))


def paired_by_key(prev: dict[str, float], cur: dict[str, float]) -> tuple[list[float], list[float]]:
    """The values of the keys (prompts, pair ids) both samples hold, in the same order."""
    keys = [k for k in cur if k in prev]
    return [prev[k] for k in keys], [cur[k] for k in keys]


def _matrix(x: Sequence[Sequence[float]], name: str) -> np.ndarray:
    m = np.asarray(x, dtype=float)
    if m.ndim != 2 or 0 in m.shape:
        raise ValueError(f"{name}: need a non-empty [seeds, units] matrix, got shape {m.shape}")
    return m


def seeded_mean_ci(x: Sequence[Sequence[float]], resamples: int = RESAMPLES, seed: int = SEED,
                   level: float = LEVEL) -> Interval:
    """Mean of a [seeds, units] matrix (the runs of one arm, the same prompts) and its
    two-level bootstrap interval: seeds and units are both resampled, so the interval holds
    the run-to-run spread as well as the prompts'. One seed: mean_ci over the units."""
    return seeded_diff_ci(x, None, resamples, seed, level)


def seeded_diff_ci(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]] | None,
                   resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """Mean of arm a − arm b ([seeds, units] each, the same units in the same order; their
    seed counts may differ) and its interval: the units are resampled once for both arms
    (paired), each arm's seeds on their own."""
    x = _matrix(a, "seeded_diff_ci a")
    y = None if b is None else _matrix(b, "seeded_diff_ci b")
    if y is not None and y.shape[1] != x.shape[1]:
        raise ValueError(f"seeded_diff_ci: the arms hold different units ({x.shape[1]} vs"
                         f" {y.shape[1]})")
    rng = np.random.default_rng(seed)
    units = rng.integers(0, x.shape[1], size=(resamples, x.shape[1]))

    def resampled(m: np.ndarray) -> np.ndarray:
        seeds = rng.integers(0, m.shape[0], size=(resamples, m.shape[0]))
        per_seed = m[seeds[:, :, None], units[:, None, :]]  # [resamples, seeds, units]
        return per_seed.mean(axis=(1, 2))

    means = resampled(x) - (resampled(y) if y is not None else 0.0)
    value = x.mean() - (y.mean() if y is not None else 0.0)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))
