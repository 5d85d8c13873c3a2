"""The report of a sweep: its runs' final evaluations side by side, arm against arm.

For each arm (a point of the grid without its seeds) at the last evaluated round: the gold
gain over the reference, the win rate against it and the KL to it, each a mean over the
arm's seeds and the held-out prompts with a two-level bootstrap interval (seeds and prompts
resampled, pipeline.evalstats.seeded_mean_ci), and the mean logit gap h (the eval reward
margin over β) beside the principled loss's target h*. Every other arm is compared with
the first (the grid's first values): the paired difference of each metric over the same
prompts, significant when its interval excludes 0 (each comparison at 95%, not corrected
for the number of arms). Runs of several rounds get a table by round. Writes report.md,
results.csv (a row per run) and two plots:
metrics against KL (every round of every run) and training curves against the step.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.console import console
from pipeline.evalstats import Interval, seeded_diff_ci, seeded_mean_ci, unit_keys
from pipeline.metrics import read_metrics, train_steps

# (column of evaluate's samples.parquet, what the report calls it); per prompt
PROMPT_METRICS = [("gold", "gold"), ("gain", "gold gain"), ("win", "win rate"), ("kl", "KL")]
NULLS = {"gold": None, "gain": 0.0, "win": 0.5, "kl": 0.0}


# (evaluate's metric, the row's name): means over an arm's seeds, beside the intervals
ROW_MEANS = [("train/h_half", "h train half"), ("train/h_end", "h train end"),
             ("eval/len_policy", "length"), ("eval/len_reference", "ref length"),
             ("eval/ranking/accuracy", "rank acc"), ("eval/ref_ranking_accuracy", "ref rank acc")]


@dataclass
class RunResult:
    name: str
    arm: str
    round: int
    metrics: dict[str, Any]  # the last evaluate row of metrics.jsonl
    per_prompt: dict[str, dict[Any, float]]  # column → {(place, prompt): value}
    beta: float | None


def evals_by_round(run) -> dict[int, dict[str, Any]]:
    """{round: its evaluate row} of the run's rounds (a rerun appends rows: the last one
    counts; rounds past the config's count, left from an earlier longer run, do not)."""
    rows = [r for r in read_metrics(run.dir / "metrics.jsonl") if r.get("kind") == "eval"]
    return {r["round"]: r for r in rows if r["round"] < run.cfg.rounds.count}


def collect(run) -> RunResult | None:
    """A finished run's final evaluation (None without one). Per-prompt values are keyed by
    evalstats.unit_keys: evaluate takes the same prompts in the same order for every run of
    the same eval data."""
    import pyarrow.parquet as pq

    from pipeline.config import validate_loss

    evals = evals_by_round(run)
    if not evals:
        return None
    k = max(evals)
    per_prompt: dict[str, dict[Any, float]] = {}
    path = run.dir / f"round-{k}" / "evaluate" / "samples.parquet"
    if path.is_file():
        t = pq.read_table(path).to_pydict()
        keys = unit_keys("samples", t)
        per_prompt["kl"] = dict(zip(keys, t["kl"]))
        if "gold_policy" in t:
            per_prompt["gold"] = dict(zip(keys, t["gold_policy"]))
            per_prompt["gain"] = {p: a - b for p, a, b in
                                  zip(keys, t["gold_policy"], t["gold_reference"])}
            per_prompt["win"] = dict(zip(keys, t["win"]))
    beta = validate_loss(run.cfg.loss).get("beta")
    return RunResult(run.name, run.arm, k, {**evals[k], **train_gap(run, beta)}, per_prompt, beta)


def train_gap(run, beta: float | None) -> dict[str, float]:
    """h on the training batches (their reward margin over β) half-way through training and
    at its last step: whether the gap settles or keeps growing."""
    rows = train_steps(read_metrics(run.dir / "metrics.jsonl"))
    margins = [r["rewards/margins"] for r in rows if r.get("rewards/margins") is not None]
    if not beta or not margins:
        return {}
    return {"train/h_half": margins[(len(margins) - 1) // 2] / beta, "train/h_end": margins[-1] / beta}


def _values(results: list[RunResult], column: str, prompts: list[Any]) -> list[list[float]]:
    """[seeds, prompts] of one per-prompt column."""
    return [[r.per_prompt[column][p] for p in prompts] for r in results]


def _common_prompts(results: list[RunResult], column: str) -> list[Any]:
    if not results or any(column not in r.per_prompt for r in results):
        return []
    first = results[0].per_prompt[column]
    return [p for p in first if all(p in r.per_prompt[column] for r in results)]


def _cell(ci: Interval | None, null: float | None = None) -> str:
    if ci is None:
        return "-"
    star = " *" if null is not None and ci.excludes(null) else ""
    return f"{ci.value:.3f} ± {ci.half_width:.3f}{star}"


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(results: list[RunResult], arms: list[str] | None = None
              ) -> tuple[list[dict[str, Any]], list[str]]:
    """A row per arm (its metrics and intervals), and the comparisons of each arm with the
    first of `arms` (the grid's order; default: the results' order)."""
    by_arm: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        by_arm[r.arm].append(r)
    order = [a for a in (arms or list(by_arm)) if a in by_arm]
    rows, notes = [], []
    for arm in order:
        rs = by_arm[arm]
        row: dict[str, Any] = {"arm": arm, "seeds": len(rs),
                               "round": "/".join(str(k) for k in sorted({r.round for r in rs}))}
        for column, _ in PROMPT_METRICS:
            prompts = _common_prompts(rs, column)
            row[column] = seeded_mean_ci(_values(rs, column, prompts)) if prompts else None
        row["prompts"] = len(_common_prompts(rs, "kl"))
        row["h"] = _mean([r.metrics["eval/rewards/margins"] / r.beta
                          if r.beta and "eval/rewards/margins" in r.metrics else None for r in rs])
        row["h_star"] = _mean([r.metrics.get("eval/principled/target_mean") for r in rs])
        for key, name in ROW_MEANS:
            row[name] = _mean([r.metrics.get(key) for r in rs])
        rows.append(row)
    first = (arms or order or [None])[0]
    if first is not None and first not in by_arm:
        notes.append(f"the first arm, {first}, has no results: no arm is compared")
        return rows, notes
    for arm in order[1:]:
        base, other = by_arm[first], by_arm[arm]
        parts = []
        for column, label in PROMPT_METRICS:
            prompts = _common_prompts(base + other, column)
            if not prompts or NULLS[column] is None:  # gold: its gain says the same, paired
                continue
            ci = seeded_diff_ci(_values(other, column, prompts), _values(base, column, prompts))
            verdict = "significant" if ci.excludes(0.0) else "not significant"
            parts.append(f"{label} {ci.value:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}] ({verdict})")
        if parts:
            n = len(_common_prompts(base + other, "kl"))
            notes.append(f"{arm} vs {first} ({n} prompts): " + "; ".join(parts))
    return rows, notes


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


ROUND_KEYS = [("eval/gold_gain", "gold gain"), ("eval/win_rate", "win rate"), ("eval/kl", "KL"),
              ("eval/len_policy", "length")]


def by_round(runs: list) -> list[list[str]]:
    """A row per arm and evaluated round (runs with more than one): the means over the arm's
    seeds of the round's evaluation, and the pairs each round trained on (its train stage's
    manifest). Empty when every run evaluates one round."""
    from pipeline.manifest import Manifest

    cells: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        if run.status != "done":
            continue
        evals = evals_by_round(run)
        if len(evals) < 2:
            continue
        for k, row in evals.items():
            train = Manifest.read(run.dir / f"round-{k}" / "train")
            pairs = train.outputs.get("trained_pairs", train.outputs.get("num_pairs")) if train else None
            cells[(run.arm, k)].append({**row, "pairs": pairs})
    arms = list(dict.fromkeys(run.arm for run in runs))
    return [[arm, str(k), str(len(rs)), _fmt(_mean([r["pairs"] for r in rs]), 0),
             *(_fmt(_mean([r.get(key) for r in rs]), 1 if key == "eval/len_policy" else 3)
               for key, _ in ROUND_KEYS)]
            for arm in arms for (a, k), rs in sorted(cells.items(), key=lambda c: c[0][1])
            if a == arm]


def write_report(sweep_dir: Path, runs: list) -> Path:
    """report.md, results.csv and the plots under sweep_dir/report; the table on the console."""
    from rich import box
    from rich.table import Table

    out = sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    found = {run.name: collect(run) for run in runs if run.status == "done"}
    results = [r for r in found.values() if r is not None]
    rows, notes = summarize(results, list(dict.fromkeys(run.arm for run in runs)))
    header = ["arm", "seeds", "round", "prompts", *(label for _, label in PROMPT_METRICS),
              "h", "h*", "h train ½ → end", "length", "rank acc"]
    table_rows = [[row["arm"], str(row["seeds"]), row["round"], str(row["prompts"]),
                   *(_cell(row[c], NULLS[c]) for c, _ in PROMPT_METRICS),
                   _fmt(row["h"]), _fmt(row["h_star"]),
                   f"{_fmt(row['h train half'], 2)} → {_fmt(row['h train end'], 2)}",
                   _fmt(row["length"], 1),
                   _fmt(row["rank acc"])] for row in rows]
    missing = [run.name for run in runs if found.get(run.name) is None]
    legend = ("± 95% interval (bootstrap over seeds and held-out prompts); * differs from the"
              " reference (gold gain ≠ 0, win rate ≠ 0.5, KL ≠ 0); h: the eval reward margin"
              " over β (the mean logit gap) on the held-out pairs, h*: the principled loss's target, h train:"
              " the training batches' gap half-way through training and at its last step; length: tokens"
              " per sampled answer; rank acc: held-out pairs whose chosen answer the policy"
              " ranks higher (means over seeds)")
    ref = {k: _mean([row[k] for row in rows]) for k in ("ref length", "ref rank acc")}
    if ref["ref length"] is not None:
        legend += (f"; the reference: length {_fmt(ref['ref length'], 1)},"
                   f" rank acc {_fmt(ref['ref rank acc'])}")
    if any(row["seeds"] < 3 for row in rows):
        legend += ("; with fewer than 3 seeds an interval holds little of the run-to-run"
                   " spread (1 seed: none), so read its * with care")
    md = [f"# Sweep report: {sweep_dir}", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(r) + " |" for r in table_rows), "", legend, "",
          ("## Against the first arm (paired over the same prompts; each at 95%, not corrected"
          " for the number of arms)"), "", *(f"- {n}" for n in notes or ["(one arm only)"]), ""]
    rounds = by_round(runs)
    if rounds:
        head = ["arm", "round", "seeds", "pairs trained", *(label for _, label in ROUND_KEYS)]
        md += ["## By round (means over seeds)", "", "| " + " | ".join(head) + " |",
               "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rounds), ""]
    if missing:
        md += [f"Runs without results (failed or unfinished): {', '.join(missing)}", ""]
    plots = _plots(out, runs, results)
    md += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(md) + "\n")
    _write_csv(out / "results.csv", results)
    table = Table(title=f"sweep of {len(runs)} runs, {sweep_dir}", box=box.SIMPLE_HEAD,
                  show_edge=False)
    for h in header:
        table.add_column(h, justify="left" if h == "arm" else "right")
    for r in table_rows:
        table.add_row(*r)
    console.print(table)
    console.print(legend, highlight=False)
    for n in notes:
        console.print(f"  {n}", highlight=False, soft_wrap=True)
    return out / "report.md"


CSV_KEYS = ["eval/gold_gain", "eval/gold_gain_low", "eval/gold_gain_high", "eval/win_rate",
            "eval/win_rate_low", "eval/win_rate_high", "eval/kl", "eval/kl_low", "eval/kl_high",
            "eval/rewards/margins", "eval/principled/target_mean", "eval/loss",
            "eval/gold_policy", "eval/gold_reference", "eval/len_policy", "eval/len_reference",
            "eval/ranking/accuracy", "eval/ref_ranking_accuracy", "train/h_half", "train/h_end"]


def _write_csv(path: Path, results: list[RunResult]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "arm", "round", *CSV_KEYS])
        for r in results:
            w.writerow([r.name, r.arm, r.round, *(r.metrics.get(k, "") for k in CSV_KEYS)])


def _plots(out: Path, runs: list, results: list[RunResult]) -> list[Path]:
    """metric_vs_kl.png (gold gain and win rate against KL, every evaluated round of every
    run, one colour per arm) and metric_vs_step.png (training loss, reward margin and the
    principled gap |h − h*| against the optimizer step, counted across rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [run for run in runs if run.status == "done"]
    if not done:
        return []
    colours = {arm: f"C{i % 10}" for i, arm in enumerate(dict.fromkeys(r.arm for r in done))}
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in done:
        evals = evals_by_round(run)
        points = [evals[k] for k in sorted(evals)]
        for ax, key in zip(axes, ["eval/gold_gain", "eval/win_rate"]):
            xs = [p["eval/kl"] for p in points if key in p]
            ys = [p[key] for p in points if key in p]
            ax.plot(xs, ys, "o-", color=colours[run.arm], alpha=0.8,
                    label=run.arm if run is next(d for d in done if d.arm == run.arm) else None)
    for ax, key in zip(axes, ["gold gain", "win rate"]):
        ax.set_xlabel("KL to the reference (eval)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("every evaluated round of every run (points of a run joined in round order)")
    fig.tight_layout()
    fig.savefig(out / "metric_vs_kl.png", dpi=100)
    plt.close(fig)
    written.append(out / "metric_vs_kl.png")

    keys = ["loss", "rewards/margins", "principled/gap_to_target"]
    fig, axes = plt.subplots(1, len(keys), figsize=(15, 4.5))
    for run in done:
        ordered = train_steps(read_metrics(run.dir / "metrics.jsonl"))
        for ax, key in zip(axes, keys):
            ys = [(i + 1, r[key]) for i, r in enumerate(ordered) if key in r]
            if ys:
                ax.plot(*zip(*ys), color=colours[run.arm], alpha=0.7)
    for ax, key in zip(axes, keys):
        ax.set_xlabel("optimizer step (across rounds)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, label=a) for a, c in colours.items()]
    axes[0].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "metric_vs_step.png", dpi=100)
    plt.close(fig)
    written.append(out / "metric_vs_step.png")
    return written
