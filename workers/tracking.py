"""Experiment trackers (TRL's `report_to`): every metrics.jsonl row, also in TensorBoard or W&B.

The MetricsSink actor is the one place every metric row passes (train steps from the rank-0
worker, eval and prepare counts from the driver), so it owns the trackers: `Trackers.log`
turns a row into a `Point` (scalar names, one step axis) and hands it to each backend.

Step axes, the same in every backend:
  train rows   `train/global_step`: optimizer steps across all rounds (a round's steps follow
               the last step logged in the round before); `train/round` and `train/round_step`
               are logged beside it.
  other rows   `<kind>/round`: the round index (eval once per round, prepare once per split).

Names: a row key `k` of kind `kind` becomes `kind/k` (`train/loss`), keys that already carry
the prefix stay (`eval/win_rate`), and a row's `split` goes in between
(`prepare/train/quarantined`). Strings (digests, paths) and non-finite values are not scalars.
The run config is logged once at the start, the final evaluation table once at the end.
Nothing here reads or writes credentials: W&B online mode takes WANDB_API_KEY from the
environment inside the wandb library.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

AXIS_KEYS = {"step", "round", "time", "kind", "split"}  # axes and labels, not values


@dataclass(frozen=True)
class Point:
    kind: str
    axis: str  # name of the step axis, e.g. "train/global_step"
    step: int
    values: dict[str, float]


@dataclass(frozen=True)
class SummaryTable:
    """The run's final evaluation table (pipeline/dag.py print_summary), as plain strings."""

    title: str
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in self.rows])


def table_data(table: Any) -> SummaryTable:
    """A rich.table.Table → SummaryTable (cells as their plain text)."""
    from rich.text import Text

    def plain(cell: Any) -> str:
        return cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain

    columns = [plain(c.header) for c in table.columns]
    cells = [[plain(x) for x in c.cells] for c in table.columns]
    return SummaryTable(plain(table.title or ""), columns, [list(r) for r in zip(*cells)])


def scalar_values(kind: str, row: dict[str, Any]) -> dict[str, float]:
    prefix = f"{kind}/{row['split']}/" if isinstance(row.get("split"), str) else f"{kind}/"
    out = {}
    for key, value in row.items():
        if key in AXIS_KEYS or isinstance(value, str) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key if key.startswith(f"{kind}/") else prefix + key] = float(value)
    return out


class StepAxis:
    """train/global_step: a round's steps continue from the last step of the round before."""

    def __init__(self) -> None:
        self.last: dict[int, int] = {}  # round → last step logged in it

    def global_step(self, round_index: int, step: int) -> int:
        self.last[round_index] = max(self.last.get(round_index, 0), step)
        return sum(v for r, v in self.last.items() if r < round_index) + step


def to_point(kind: str, row: dict[str, Any], round_index: int, axis: StepAxis) -> Point:
    values = scalar_values(kind, row)
    if kind == "train":
        step = int(row.get("step", 0))
        values.update({"train/round": float(round_index), "train/round_step": float(step)})
        return Point(kind, "train/global_step", axis.global_step(round_index, step), values)
    return Point(kind, f"{kind}/round", round_index, values)


# --- backends: one small class each, the same four methods ---------------------------------

class TensorBoardTracker:
    """Event files under <run_dir>/tensorboard/ (`tensorboard --logdir <run_dir>/tensorboard`)."""

    def __init__(self, run_dir: Path, name: str, cfg: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), flush_secs=10)

    def log_config(self, config: dict[str, Any]) -> None:
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))

    def log(self, point: Point) -> None:
        for name, value in point.values.items():
            self.writer.add_scalar(name, value, global_step=point.step)

    def log_table(self, table: SummaryTable) -> None:
        self.writer.add_text("evaluation", f"**{table.title}**\n\n{table.markdown()}")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run under <run_dir>/wandb/ (offline by default: `wandb sync` uploads it later)."""

    def __init__(self, run_dir: Path, name: str, cfg: Any) -> None:
        import wandb

        self.wandb = wandb
        root = run_dir / "wandb-data"  # W&B's cache and artifact staging, off the home dir
        for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                         ("WANDB_ARTIFACT_DIR", "artifacts"), ("WANDB_CONFIG_DIR", "config")):
            os.environ[var] = str(root / sub)  # this process is the sink actor's own
        os.environ["WANDB_MODE"] = cfg.wandb_mode
        if cfg.wandb_mode == "offline":
            os.environ["WANDB_ERROR_REPORTING"] = "false"  # no telemetry upload either
        self.axes: set[str] = set()
        self.run = wandb.init(
            project=cfg.wandb_project, name=name, dir=str(run_dir), mode=cfg.wandb_mode,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                    disable_git=True, save_code=False,
                                    x_save_requirements=False))

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config)

    def log(self, point: Point) -> None:
        if point.axis not in self.axes:  # each kind's values are plotted against its own axis
            self.axes.add(point.axis)
            self.run.define_metric(point.axis)
            self.run.define_metric(f"{point.kind}/*", step_metric=point.axis)
        self.run.log({**point.values, point.axis: point.step})

    def log_table(self, table: SummaryTable) -> None:
        self.run.log({"evaluation": self.wandb.Table(columns=table.columns, data=table.rows)})

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run: a local file store under <run_dir>/mlflow, or tracking.mlflow_uri."""

    def __init__(self, run_dir: Path, name: str, cfg: Any) -> None:
        from mlflow.tracking import MlflowClient

        uri = cfg.mlflow_uri or (run_dir / "mlflow").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store only on request
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(cfg.mlflow_experiment))
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(config)
        params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # MLflow takes 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log(self, point: Point) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(_mlflow_name(k), v, now, point.step) for k, v in point.values.items()])

    def log_table(self, table: SummaryTable) -> None:
        self.client.log_text(self.run_id, f"# {table.title}\n\n{table.markdown()}\n",
                             "evaluation.md")
        self.client.log_dict(self.run_id, {"columns": table.columns, "data": table.rows},
                             "evaluation.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _mlflow_name(name: str) -> str:
    """MLflow names allow letters, digits, _ - . space : / only."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in name)


BACKENDS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


class Trackers:
    """The configured backends behind one interface; the MetricsSink forwards rows here."""

    def __init__(self, tracking: dict[str, Any], run_dir: Path, config: dict[str, Any]) -> None:
        from pipeline.config import TrackingConfig

        cfg = TrackingConfig.model_validate(tracking)
        name = cfg.run_name or run_dir.name
        self.axis = StepAxis()
        self.backends = [BACKENDS[b](run_dir, name, cfg) for b in cfg.backends]
        for backend in self.backends:
            backend.log_config(config)

    def log(self, kind: str, row: dict[str, Any], round_index: int) -> None:
        point = to_point(kind, row, round_index, self.axis)
        if point.values:
            for backend in self.backends:
                backend.log(point)

    def finish(self, table: SummaryTable | None) -> None:
        for backend in self.backends:
            if table is not None:
                backend.log_table(table)
            backend.close()
        self.backends = []
