"""The study's learning-rate choice: from a pilot sweep (arms × train.learning_rate, one
seed), each arm's learning rate with the highest gold gain at its last evaluated round,
written into a copy of the arms file for the main sweep (on other seeds, so the choice is
not scored on the runs that made it).

    .venv/bin/python bench/study_pick_lr.py PILOT_SWEEP_DIR bench/study/arms.yaml OUT.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.metrics import read_metrics

METRIC = "eval/gold_gain"


def final_metric(run_dir: Path) -> float | None:
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    if not evals:
        return None
    last = max(r["round"] for r in evals)
    return [r for r in evals if r["round"] == last][-1].get(METRIC)


def pick(sweep_dir: Path) -> dict[str, tuple[float, dict[float, float]]]:
    """{arm: (chosen lr, {lr: metric})} over the pilot's finished runs."""
    state = json.loads((sweep_dir / "sweep.json").read_text())
    scores: dict[str, dict[float, float]] = {}
    for run in state["runs"]:
        value = final_metric(Path(run["run_dir"])) if run["status"] == "done" else None
        if value is not None:
            scores.setdefault(run["point"]["arm"], {})[run["point"]["train.learning_rate"]] = value
    return {arm: (max(by_lr, key=by_lr.get), by_lr) for arm, by_lr in scores.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pilot", type=Path)
    p.add_argument("arms", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args()
    arms = yaml.safe_load(args.arms.read_text())["arms"]
    chosen = pick(args.pilot)
    missing = [a for a in arms if a not in chosen]
    if missing:
        sys.exit(f"no finished pilot run for arm(s) {missing} in {args.pilot}")
    for arm, (lr, by_lr) in chosen.items():
        arms[arm] = {**arms[arm], "train.learning_rate": lr}
        print(f"{arm:<20} lr {lr:g}   " + "  ".join(f"{k:g}: {v:+.3f}" for k, v in sorted(by_lr.items())))
    args.out.write_text(f"# {METRIC} picked each arm's learning rate in the pilot {args.pilot}"
                        f" (bench/study_pick_lr.py)\n" + yaml.safe_dump({"arms": arms}, sort_keys=False))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
