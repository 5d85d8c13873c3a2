"""metrics.jsonl → PNG plots a person can read: training curves and per-round evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRAIN_PANELS = [
    ("loss", ["loss"]),
    ("implicit rewards (β·log π/π_ref)", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
    ("policy log-probs", ["logps/chosen", "logps/rejected"]),
    ("accuracy", ["rewards/accuracies", "ranking/accuracy"]),
    ("principled: target and gap", ["principled/target_mean", "principled/gap_to_target"]),
    ("grad norm / lr", ["grad_norm"]),
]
EVAL_KEYS = ["eval/gold_policy", "eval/gold_reference", "eval/gold_gain", "eval/win_rate", "eval/kl",
             "eval/rewards/margins", "eval/ranking/accuracy", "eval/len_policy"]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_steps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The train rows in optimizer-step order across rounds; a step redone after a resume
    appears again in metrics.jsonl, and its last row counts."""
    steps: dict[tuple[int, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("kind") == "train":
            steps[(r.get("round", 0), r.get("step", 0))] = r
    return [steps[k] for k in sorted(steps)]


def lifecycle_line(rows: list[dict[str, Any]], since: float = 0.0) -> str:
    """What started and what was loaded since `since` (a driver session's start), from the
    `lifecycle` rows: 'engines: 2 started (1 restart), 3 weight updates (0.07 s, 2 from the
    trainer's memory); trainer: 1 start (ZeRO-3)'."""
    events = [r for r in rows if r.get("kind") == "lifecycle" and r.get("time", 0) >= since]
    starts = [r for r in events if r["event"] == "engine_start"]
    updates = [r for r in events if r["event"] == "weight_update"]
    trainers = [r for r in events if r["event"] == "trainer_start"]
    scorers = [r for r in events if r["event"] == "scorer_start"]
    restarts = sum(bool(r.get("restarted")) for r in starts)
    pushed = sum(r.get("via") == "object_store" for r in updates)
    text = (f"engines: {len(starts)} started" + (f" ({restarts} restarts)" if restarts else "")
            + f", {len(updates)} weight updates ({sum(r['seconds'] for r in updates):.2f} s"
            + (f", {pushed} from the trainer's memory" if pushed else "") + ")")
    text += f"; trainer: {len(trainers)} start{'s' * (len(trainers) != 1)}"
    stages = sorted({r["zero_stage"] for r in trainers if "zero_stage" in r})
    if stages:  # the stage the workers trained at (train.zero_stage auto decides there)
        text += f" (ZeRO-{'/'.join(map(str, stages))})"
    if scorers:  # a reward model or a judge (a reward function has no actors)
        text += f"; scorers: {sum(r['actors'] for r in scorers)} started"
    return text


def plot_run(run_dir: Path) -> list[Path]:
    """Write train.png and eval.png into run_dir/plots; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / "metrics.jsonl")
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    train = train_steps(rows)
    if train:
        fig, axes = plt.subplots(2, 3, figsize=(15, 8))
        x = list(range(1, len(train) + 1))  # global step across rounds
        for ax, (title, keys) in zip(axes.flat, TRAIN_PANELS):
            for k in keys:
                ys = [r.get(k) for r in train]
                if any(y is not None for y in ys):
                    ax.plot(x, [float("nan") if y is None else y for y in ys], label=k)
            ax.set_title(title)
            ax.set_xlabel("optimizer step (all rounds)")
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "train.png")
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)
    evals = [r for r in rows if r.get("kind") == "eval"]
    if evals:
        keys = [k for k in EVAL_KEYS if any(k in r for r in evals)]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
        for ax, k in zip(axes[0], keys):
            have = [(r.get("round", i), r) for i, r in enumerate(evals) if r.get(k) is not None]
            x, y = [i for i, _ in have], [r[k] for _, r in have]
            # 95% intervals (evaluate's <key>_low/_high) as error bars, where recorded
            err = [[r[k] - (r.get(f"{k}_low") if r.get(f"{k}_low") is not None else r[k]) for _, r in have],
                   [(r.get(f"{k}_high") if r.get(f"{k}_high") is not None else r[k]) - r[k]
                    for _, r in have]]
            ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3)
            ax.set_title(k.removeprefix("eval/") + (" (95% CI)" if any(f"{k}_low" in r for r in evals)
                                                     else ""), fontsize=9)
            ax.set_xlabel("round")
        fig.tight_layout()
        written.append(out_dir / "eval.png")
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)
    return written
