"""Study report: mean ± spread tables over seeds (markdown) and the PNG plots.

Input is the study's `results` dict: lists of flat records under "steps" (one per optimizer
step), "checkpoints" (one per evaluation), "online" (one per online round) and "reference"
(the reference model's samples, one per seed). Spread = standard deviation over seeds.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]


# -----------------------------------------------------------------------------
# aggregation


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds (0 for one seed)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 2) -> str:
    m, s = mean_spread(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def by(records: Iterable[Record], *keys: str) -> dict[tuple, list[Record]]:
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in keys)].append(r)
    return groups


def final_checkpoints(results: dict[str, list[Record]], rnd: int = 0) -> dict[str, list[Record]]:
    """Per arm: each seed's last checkpoint of round `rnd`."""
    out: dict[str, list[Record]] = defaultdict(list)
    for (arm, _seed), recs in by([c for c in results["checkpoints"] if c["round"] == rnd],
                                 "arm", "seed").items():
        out[arm].append(max(recs, key=lambda r: r["step"]))
    return out


def per_seed(results: dict[str, list[Record]], arm: str, rnd: int,
             fn: Callable[[list[Record]], float]) -> list[float]:
    """fn over each seed's checkpoints of `arm` in round `rnd` (sorted by step)."""
    groups = by([c for c in results["checkpoints"] if c["arm"] == arm and c["round"] == rnd],
                "seed")
    return [fn(sorted(recs, key=lambda r: r["step"])) for recs in groups.values()]


def column(recs: Sequence[Record]) -> Callable[..., str]:
    """key, digits → "mean ± sd" of that key over `recs` (one record per seed)."""
    return lambda key, digits=2: fmt([r[key] for r in recs], digits)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# markdown


def offline_table(results: dict[str, list[Record]], arms: Sequence[str]) -> str:
    final = final_checkpoints(results)
    ref = results["reference"]
    header = ["arm", "h train (h*)", "\\|h − h*\\| train", "h held-out", "Δ log π(y_w) train",
              "Δ log π(y_l) train", "reward acc", "ranking acc", "KL", "gold", "quality",
              "length bonus", "length (tokens)", "win rate"]
    ref_ranking = per_seed(results, arms[0], 0, lambda rs: rs[0]["eval/ranking_acc"])
    rows = [["reference", "0", "–", "0", "0", "0", "–", fmt(ref_ranking), "0",
             fmt([r["gold"] for r in ref], 3), fmt([r["quality"] for r in ref], 3),
             fmt([r["length_bonus"] for r in ref], 3), fmt([r["length_tokens"] for r in ref], 1),
             "0.5"]]
    for arm in arms:
        col = column(final[arm])
        rows.append([arm, f"{col('train/h_mean')} ({col('train/own_h_star_mean', 1)})",
                     col("train/own_gap_to_target"), col("eval/h_mean"),
                     col("train/logratio_chosen"), col("train/logratio_rejected"),
                     col("eval/reward_acc"), col("eval/ranking_acc"), col("kl"),
                     col("gold", 3), col("quality", 3), col("length_bonus", 3),
                     col("length_tokens", 1), col("win_rate")])
    return table(header, rows)


def growth_table(results: dict[str, list[Record]], arms: Sequence[str]) -> str:
    """Does h settle? h on the fixed train subset at the half-way and the last checkpoint,
    and the peak-to-final change of gold reward (over-optimisation shows as a drop)."""
    header = ["arm", "h train, half-way", "h train, end", "h*", "peak gold (any checkpoint)",
              "final − peak gold", "final − initial quality", "final − initial length bonus",
              "grad norm, last 10% of steps"]
    rows = []
    for arm in arms:
        def at_half(rs: list[Record]) -> float:
            return rs[len(rs) // 2]["train/h_mean"]
        rows.append([
            arm, fmt(per_seed(results, arm, 0, at_half)),
            fmt(per_seed(results, arm, 0, lambda rs: rs[-1]["train/h_mean"])),
            fmt(per_seed(results, arm, 0, lambda rs: rs[-1]["train/own_h_star_mean"]), 1),
            fmt(per_seed(results, arm, 0, lambda rs: max(r["gold"] for r in rs)), 3),
            fmt(per_seed(results, arm, 0,
                         lambda rs: rs[-1]["gold"] - max(r["gold"] for r in rs)), 3),
            fmt(per_seed(results, arm, 0, lambda rs: rs[-1]["quality"] - rs[0]["quality"]), 3),
            fmt(per_seed(results, arm, 0,
                         lambda rs: rs[-1]["length_bonus"] - rs[0]["length_bonus"]), 3),
            fmt(late_grad_norms(results, arm)),
        ])
    return table(header, rows)


def late_grad_norms(results: dict[str, list[Record]], arm: str) -> list[float]:
    """Per seed: mean pre-clipping gradient norm over the last 10% of the offline steps."""
    out = []
    for recs in by([r for r in results["steps"] if r["arm"] == arm and r["round"] == 0],
                   "seed").values():
        recs = sorted(recs, key=lambda r: r["step"])
        tail = recs[-max(1, len(recs) // 10):]
        out.append(statistics.fmean(r["grad_norm"] for r in tail))
    return out


def online_table(results: dict[str, list[Record]], arms: Sequence[str]) -> str:
    header = ["arm", "round", "pairs", "gold", "quality", "length bonus", "KL", "win rate",
              "length (tokens)", "h train (h*)"]
    online = by(results["online"], "arm", "round")
    rows = []
    for arm in arms:
        rounds = sorted({c["round"] for c in results["checkpoints"] if c["arm"] == arm})
        for rnd in rounds:
            col = column(final_checkpoints(results, rnd)[arm])
            pairs = online.get((arm, rnd))
            rows.append([arm, str(rnd) if rnd else "0 (offline pairs)",
                         fmt([p["pairs"] for p in pairs], 0) if pairs else "given",
                         col("gold", 3), col("quality", 3), col("length_bonus", 3), col("kl"),
                         col("win_rate"), col("length_tokens", 1),
                         f"{col('train/h_mean')} ({col('train/own_h_star_mean', 1)})"])
    return table(header, rows)


def summary_markdown(results: dict[str, list[Record]], cfg: Any, meta: dict[str, Any]) -> str:
    arms = [a for a in cfg.arms if any(c["arm"] == a for c in results["checkpoints"])]
    online_arms = [a for a in cfg.online_arms if any(o["arm"] == a for o in results["online"])]
    parts = [
        "## Alignment study — generated tables", "",
        (f"Command: `{meta['command']}` ({meta['wall_s']} s; torch {meta['torch']},"
         f" transformers {meta['transformers']}, {meta['threads']} torch threads)."),
        (f"Seeds {cfg.seeds}; {cfg.steps} steps × {cfg.batch_size} pairs, lr {cfg.learning_rate}"
         f" ({getattr(cfg, 'schedule', 'cosine')}, 10% warmup), AdamW (0.9, 0.95), clip 1.0; β = 0.1 (SimPO: its own β = 2,"
         f" γ = 1). Mean ± standard deviation over seeds."), "",
        "### Offline: end of training", "",
        ("h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), summed log-probs;"
         " \"train\" = a fixed subset of the training pairs, \"held-out\" = the eval pairs. h* is"
         " each arm's own principled target (scores mode, (s_w − s_l)/β, for non-principled"
         " arms). Accuracies are on the held-out pairs; samples (KL, gold, quality, length, win"
         " rate vs the reference) on held-out prompts."), "",
        offline_table(results, arms), "",
        "### Offline: does h settle, and is the gold reward over-optimised?", "",
        growth_table(results, arms), "",
    ]
    if online_arms:
        parts += ["### Online rounds (reference = initial model)", "",
                  online_table(results, online_arms), ""]
    return "\n".join(parts)


# -----------------------------------------------------------------------------
# plots


def _rolling(xs: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _step_curves(results: dict[str, list[Record]], arm: str, key: str, window: int
                 ) -> tuple[list[int], list[float], list[float], list[float]]:
    """Offline steps of `arm`: smoothed `key` per seed → steps, mean, min, max over seeds."""
    seeds = by([r for r in results["steps"] if r["arm"] == arm and r["round"] == 0], "seed")
    curves = [_rolling([float(r[key]) for r in sorted(rs, key=lambda r: r["step"])], window)
              for rs in seeds.values()]
    n = min(len(c) for c in curves)
    cols = [[c[i] for c in curves] for i in range(n)]
    return (list(range(n)), [statistics.fmean(c) for c in cols], [min(c) for c in cols],
            [max(c) for c in cols])


def _save(fig: Any, path: Path) -> Path:
    """Save at 80 dpi, then re-encode with a 128-colour palette (plots stay small in git)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    with Image.open(path) as im:
        palette = im.convert("RGB").quantize(colors=128)
    palette.save(path, optimize=True)
    return path


def _colors(arms: Sequence[str]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return {a: cmap(i % 10) for i, a in enumerate(arms)}


def _plot_steps(results: dict[str, list[Record]], arms: Sequence[str],
                panels: Sequence[tuple[str, str]], title: str, path: Path,
                targets: bool = False) -> Path:
    import matplotlib.pyplot as plt

    colors = _colors(arms)
    n_steps = max(r["step"] for r in results["steps"] if r["round"] == 0) + 1
    window = max(1, n_steps // 30)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for arm in arms:
            x, m, lo, hi = _step_curves(results, arm, key, window)
            ax.plot(x, m, color=colors[arm], label=arm, lw=1.4)
            ax.fill_between(x, lo, hi, color=colors[arm], alpha=0.15, lw=0)
        if targets and key == "h_mean":
            scores_target = statistics.fmean(r["h_star_mean"] for r in results["steps"])
            ax.axhline(scores_target, color="k", ls="--", lw=0.9)
            for arm in arms:
                if arm.startswith("principled-") and arm != "principled-scores":
                    own = [r["train/own_h_star_mean"] for r in final_checkpoints(results)[arm]]
                    ax.axhline(statistics.fmean(own), color=colors[arm], ls="--", lw=0.9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{title} (training batches, rolling mean over {window} steps;"
                 " band = min–max over seeds)", fontsize=9)
    return _save(fig, path)


def _plot_frontier(results: dict[str, list[Record]], arms: Sequence[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    colors = _colors(arms)
    ref = results["reference"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "gold", "gold reward (hackable)"),
                           (axes[1], "quality", "quality (gold without the length bonus)")):
        for arm in arms:
            groups = by([c for c in results["checkpoints"] if c["arm"] == arm and c["round"] == 0],
                        "step")
            steps = sorted(groups)
            kl = [statistics.fmean(c["kl"] for c in groups[s]) for s in steps]
            y = [statistics.fmean(c[key] for c in groups[s]) for s in steps]
            ax.plot(kl, y, "-o", color=colors[arm], label=arm, ms=3, lw=1.2)
            ax.plot(kl[-1:], y[-1:], "s", color=colors[arm], ms=7)
        ax.plot([0], [statistics.fmean(r[key] for r in ref)], "k*", ms=12, label="reference")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("KL(π ‖ π_ref) on held-out prompts (nats, symlog)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Gold reward vs KL over training checkpoints (mean over seeds; square = end)",
                 fontsize=9)
    return _save(fig, path)


def _plot_online(results: dict[str, list[Record]], arms: Sequence[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    colors = _colors(arms)
    ref = results["reference"]
    panels = (("gold", "gold reward"), ("quality", "quality"), ("length_bonus", "length bonus"),
              ("kl", "KL to reference"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    for ax, (key, label) in zip(axes, panels):
        for arm in arms:
            rounds = sorted({c["round"] for c in results["checkpoints"] if c["arm"] == arm})
            values = [[r[key] for r in final_checkpoints(results, rnd)[arm]] for rnd in rounds]
            means = [statistics.fmean(v) for v in values]
            spans = [[m - min(v) for m, v in zip(means, values)],
                     [max(v) - m for m, v in zip(means, values)]]
            ax.errorbar(rounds, means, yerr=spans, fmt="-o", color=colors[arm], label=arm,
                        capsize=3, ms=4)
        if key == "kl":
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=0)
        else:
            ax.axhline(statistics.fmean(r[key] for r in ref), color="k", ls=":", lw=1,
                       label="reference")
        ax.set_xticks(sorted({c["round"] for c in results["checkpoints"]}))
        ax.set_xlabel("round (0 = offline pairs)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Online rounds: held-out metrics after each round (mean; bars = min–max over seeds)",
                 fontsize=9)
    return _save(fig, path)


def plot_all(results: dict[str, list[Record]], cfg: Any, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    arms = [a for a in cfg.arms if any(c["arm"] == a for c in results["checkpoints"])]
    paths = [
        _plot_steps(results, arms, (("h_mean", "h (mean over the batch)"),
                                    ("h_std", "spread of h (sd over the batch)"),
                                    ("gap_to_target", "|h − h*| (scores target)")),
                    "Logit gap h over steps; dashed: h* (black: scores target)",
                    out / "h_over_steps.png", targets=True),
        _plot_steps(results, arms, (("logratio_chosen", "log π(y_w) − log π_ref(y_w)"),
                                    ("logratio_rejected", "log π(y_l) − log π_ref(y_l)"),
                                    ("logp_chosen", "log π(y_w) (summed)")),
                    "Chosen and rejected log-probs over steps", out / "chosen_logp_over_steps.png"),
        _plot_frontier(results, arms, out / "gold_vs_kl.png"),
    ]
    online_arms = [a for a in cfg.online_arms if any(o["arm"] == a for o in results["online"])]
    if online_arms:
        paths.append(_plot_online(results, online_arms, out / "online_rounds.png"))
    return paths
