"""A Ray actor that receives metric rows from workers, appends them to metrics.jsonl and
exports them to the Ray dashboard (Prometheus) as `ray.util.metrics` gauges and counters,
and to the experiment trackers of the config's `tracking` section (workers/tracking.py).

Workers on any node send rows here (an actor call, not a shared file), so the driver's
run directory gets every step even on a multi-node cluster. The exported names are listed
in EXPORTED (and in the README); Ray's Prometheus exporter adds its `ray_` prefix.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TAG_KEYS = ("run", "round")


@dataclass(frozen=True)
class Exported:
    """One dashboard gauge fed from a key of the rows of one kind ('train' or 'eval')."""

    name: str
    kind: str
    key: str
    description: str


EXPORTED = [
    Exported("rayalign_train_loss", "train", "loss", "training loss (mean over the step)"),
    Exported("rayalign_train_reward_margin", "train", "rewards/margins",
             "implicit reward margin beta*h, chosen minus rejected"),
    Exported("rayalign_train_reward_accuracy", "train", "rewards/accuracies",
             "fraction of pairs whose implicit reward ranks chosen first"),
    Exported("rayalign_train_ranking_accuracy", "train", "ranking/accuracy",
             "fraction of pairs where the policy gives chosen the higher log-prob"),
    Exported("rayalign_train_logit_gap", "train", "logit_gap",
             "h = reward margin / beta (needs the loss's beta)"),
    Exported("rayalign_train_target_gap", "train", "principled/target_mean",
             "h*, the principled loss's target logit gap"),
    Exported("rayalign_train_gap_to_target", "train", "principled/gap_to_target",
             "mean |h - h*| (principled loss)"),
    Exported("rayalign_train_tokens_per_second", "train", "tokens_per_s",
             "training throughput of the whole worker group"),
    Exported("rayalign_train_step", "train", "step", "last optimizer step of the round"),
    Exported("rayalign_eval_reward_accuracy", "eval", "eval/rewards/accuracies",
             "held-out implicit-reward accuracy"),
    Exported("rayalign_eval_reward_margin", "eval", "eval/rewards/margins",
             "held-out implicit reward margin"),
    Exported("rayalign_eval_ranking_accuracy", "eval", "eval/ranking/accuracy",
             "held-out ranking accuracy of the policy"),
    Exported("rayalign_eval_win_rate", "eval", "eval/win_rate",
             "gold-reward win rate of policy samples against reference samples"),
    Exported("rayalign_eval_kl", "eval", "eval/kl", "sequence KL(policy || reference) estimate"),
]
STAGE_PROGRESS = Exported("rayalign_stage_progress", "stage", "progress",
                          "fraction of the current stage done (train: steps / planned steps)")
TRAIN_STEPS = Exported("rayalign_train_steps_total", "train", "step", "optimizer steps taken")
QUARANTINED = Exported("rayalign_rows_quarantined_total", "prepare", "quarantined",
                       "input rows sent to quarantine.parquet by the prepare stage")


class DashboardMetrics:
    """The `ray.util.metrics` instruments, created inside a Ray worker process (Ray takes
    ASCII descriptions only)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self.gauges = {e.key: (e, Gauge(e.name, e.description, tag_keys=TAG_KEYS))
                       for e in EXPORTED}
        self.progress = Gauge(STAGE_PROGRESS.name, STAGE_PROGRESS.description,
                              tag_keys=(*TAG_KEYS, "stage"))
        self.steps = Counter(TRAIN_STEPS.name, TRAIN_STEPS.description, tag_keys=TAG_KEYS)
        self.quarantined = Counter(QUARANTINED.name, QUARANTINED.description,
                                   tag_keys=(*TAG_KEYS, "split"))

    def record(self, kind: str, row: dict[str, Any], tags: dict[str, str]) -> None:
        for key, (exported, gauge) in self.gauges.items():
            value = row.get(key)
            if exported.kind == kind and isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags=tags)
        if kind == "train":
            self.steps.inc(1.0, tags=tags)
        if kind == "prepare" and row.get(QUARANTINED.key):
            self.quarantined.inc(float(row[QUARANTINED.key]),
                                 tags={**tags, "split": str(row.get("split", "train"))})

    def stage_progress(self, stage: str, fraction: float, tags: dict[str, str]) -> None:
        self.progress.set(min(max(fraction, 0.0), 1.0), tags={**tags, "stage": stage})


# Row kinds that record events (an engine start, a weight update, a trainer start), several
# per round: they go to metrics.jsonl and the run's summary, not to the trackers or the
# dashboard, whose series hold one value per step.
EVENT_KINDS = frozenset({"lifecycle"})


class MetricsSink:
    def __init__(self, path: str, context: dict[str, Any], tracking: dict[str, Any] | None = None,
                 config: dict[str, Any] | None = None):
        """tracking: a TrackingConfig dump; its trackers write under path's directory (the run
        directory) and get `config` (the run config) once."""
        import ray

        from workers.tracking import Trackers

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.context = dict(context)
        self.planned: dict[str, dict[str, Any]] = {}  # stage → {"total": steps, "beta": β}
        self.first: dict[str, dict[str, Any]] = {}  # kind → first row of the current round
        self.latest: dict[str, dict[str, Any]] = {}  # kind → latest row
        self.dashboard = DashboardMetrics() if ray.is_initialized() else None
        self.trackers = (Trackers(tracking, self.path.parent, config or {})
                         if tracking and tracking.get("backends") else None)

    def _tags(self, round_index: Any = None) -> dict[str, str]:
        """A series' tags: the run, and the round of its row (else the context's)."""
        run = Path(str(self.context.get("run_dir") or "run")).name
        return {"run": run, "round": str(self.context.get("round", 0) if round_index is None
                                         else round_index)}

    def set_context(self, **context: Any) -> None:
        before = self.context.get("stage")
        self.context.update(context)
        stage = self.context.get("stage")
        if self.dashboard is not None and stage and stage != before:
            if before:
                self.dashboard.stage_progress(str(before), 1.0, self._tags())
            self.dashboard.stage_progress(str(stage), 0.0, self._tags())

    def plan(self, stage: str, total_steps: int, beta: float | None = None) -> None:
        """What the stage will do: its step count (for progress) and the loss's β (for h)."""
        self.planned[stage] = {"total": total_steps, "beta": beta}

    def log(self, kind: str, row: dict[str, Any]) -> None:
        record = {"time": time.time(), "kind": kind, **self.context, **row}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.first.get(kind, {}).get("round") != clean.get("round"):
            self.first[kind] = clean
        self.latest[kind] = clean
        if kind in EVENT_KINDS:  # events, not series: metrics.jsonl and the summary only
            return
        # a row's own round first: an evaluation logs beside the next round's stages
        if self.dashboard is not None:
            self._export(kind, row, clean.get("round"))
        if self.trackers is not None:
            self.trackers.log(kind, row, int(clean.get("round") or 0))

    def finish(self, table: Any = None) -> None:
        """End of the run: the final evaluation table (a workers.tracking.SummaryTable) goes
        to the trackers once, and they close (W&B finishes its run)."""
        if self.trackers is not None:
            self.trackers.finish(table)
            self.trackers = None

    def progress(self, stage: str, round_index: int) -> dict[str, Any]:
        """For the driver's live display: the latest row of `stage` in round `round_index`
        (step None before its first), the planned total and the rate since its first row."""
        row = self.latest.get(stage)
        if row is None or row.get("round") != round_index:
            return {"step": None, "total": self.planned.get(stage, {}).get("total")}
        first = self.first[stage]
        span = row["time"] - first["time"]
        rate = (row.get("step", 0) - first.get("step", 0)) / span if span > 0 else None
        return {**row, "total": self.planned.get(stage, {}).get("total"), "steps_per_s": rate}

    def _export(self, kind: str, row: dict[str, Any], round_index: Any = None) -> None:
        tags = self._tags(round_index)
        planned = self.planned.get("train", {})
        if kind == "train" and planned.get("beta") and "rewards/margins" in row:
            row = {**row, "logit_gap": row["rewards/margins"] / planned["beta"]}
        self.dashboard.record(kind, row, tags)
        if kind == "train" and planned.get("total"):
            self.dashboard.stage_progress("train", row.get("step", 0) / planned["total"], tags)
        if kind == "eval":
            self.dashboard.stage_progress("evaluate", 1.0, tags)
