"""Read a run's tracker output back with each library's own reader (offline), and the rows a
short test run logs through the MetricsSink. Shared by the unit and integration tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# A short run: prepare counts, two rounds of three train steps, an eval per round.
CONFIG = {"run_dir": "x", "loss": {"name": "dpo", "params": {"beta": 0.1}}}
PREPARE = [{"split": "train", "pairs": 61, "quarantined": 3},
           {"split": "eval", "pairs": 16, "quarantined": 0}]
TRAIN = {r: [{"step": s, "loss": 0.7 - 0.1 * s - 0.05 * r, "rewards/margins": 0.02 * s + r,
              "lr": 1e-4, "batch_digest": f"d{r}{s}", "grad_norm": float("nan")}
             for s in (1, 2, 3)] for r in (0, 1)}
EVAL = {r: {"round": r, "eval/win_rate": 0.5 + 0.1 * r, "eval/kl": 0.01 * (r + 1)}
        for r in (0, 1)}
GLOBAL_STEP = {(0, 1): 1, (0, 2): 2, (0, 3): 3, (1, 1): 4, (1, 2): 5, (1, 3): 6}


def log_short_run(sink: Any, call=lambda f, *a, **k: f(*a, **k)) -> None:
    """Log the short run into a sink; `call` wraps each method call (e.g. Ray's remote + get)."""
    call(sink.set_context, round=0, stage="prepare")
    for row in PREPARE:
        call(sink.log, "prepare", row)
    for r in (0, 1):
        call(sink.set_context, round=r, stage="train")
        for row in TRAIN[r]:
            call(sink.log, "train", row)
        call(sink.set_context, round=r, stage="evaluate")
        call(sink.log, "eval", EVAL[r])


def expected_scalars() -> dict[str, dict[int, float]]:
    """name → {step: value} that the short run must leave in every tracker."""
    out: dict[str, dict[int, float]] = {}
    for row in PREPARE:
        for k in ("pairs", "quarantined"):
            out.setdefault(f"prepare/{row['split']}/{k}", {})[0] = row[k]
    for r, rows in TRAIN.items():
        for row in rows:
            g = GLOBAL_STEP[(r, row["step"])]
            for k in ("loss", "rewards/margins", "lr"):
                out.setdefault(f"train/{k}", {})[g] = row[k]
            out.setdefault("train/round", {})[g] = r
            out.setdefault("train/round_step", {})[g] = row["step"]
    for r, row in EVAL.items():
        for k in ("eval/win_rate", "eval/kl"):
            out.setdefault(k, {})[r] = row[k]
    return out


def read_tensorboard(run_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    """(scalars name → {step: value}, texts tag → text) from <run_dir>/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags["scalars"]}
    texts = {t.removesuffix("/text_summary"): acc.Tensors(t)[0].tensor_proto.string_val[0].decode()
             for t in tags["tensors"]}
    return scalars, texts


def wandb_run_dir(run_dir: Path) -> Path:
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def wandb_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of the one offline W&B run under run_dir, decoded by wandb's own
    transaction-log reader (`wandb leet inspect --json`, no network)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                          str(wandb_run_dir(run_dir))],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={"WANDB_ERROR_REPORTING": "false", "WANDB_MODE": "offline",
                              "PATH": "/usr/bin:/bin", "HOME": str(run_dir)})
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def read_wandb(run_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, Any], dict[str, Any]]:
    """(scalars name → {step on the name's own axis: value}, the logged config, tables
    key → {"columns", "data"}) of the offline W&B run under run_dir."""
    records = wandb_records(run_dir)
    axes = {m["metric"]["glob_name"]: m["metric"]["step_metric"] for m in records
            if m["type"] == "metric" and "glob_name" in m["metric"]}
    config: dict[str, Any] = {}
    for rec in records:
        if rec["type"] in ("run", "config"):
            update = (rec["run"]["config"] if rec["type"] == "run" else rec["config"]).get("update")
            config.update(update or {})
    config.pop("_wandb", None)
    scalars: dict[str, dict[int, float]] = {}
    tables: dict[str, Any] = {}
    files = wandb_run_dir(run_dir) / "files"
    for rec in (r for r in records if r["type"] == "history"):
        item = rec["history"]["item"]
        for name, value in item.items():
            if name.endswith("._type") and value == "table-file":
                key = name.removesuffix("._type")
                tables[key] = json.loads((files / item[f"{key}.path"]).read_text())
                assert (item[f"{key}.nrows"], item[f"{key}.ncols"]) == (
                    len(tables[key]["data"]), len(tables[key]["columns"]))
            if name.startswith("_") or "." in name or not isinstance(value, (int, float)):
                continue
            axis = axes[f"{name.split('/')[0]}/*"]  # each kind has its own step axis
            if name != axis:
                scalars.setdefault(name, {})[int(item[axis])] = value
    return scalars, config, tables


def read_mlflow(run_dir: Path, experiment: str = "rayalign") -> tuple[
        dict[str, dict[int, float]], dict[str, str], dict[str, Any], Any]:
    """(scalars name → {step: value}, params, artifacts path → text, the run) of the one MLflow
    run in the file store <run_dir>/mlflow, through MlflowClient."""
    import os

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=(run_dir / "mlflow").resolve().as_uri())
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, runs
    run = runs[0]
    scalars = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
               for name in run.data.metrics}
    local = client.download_artifacts(run.info.run_id, "", str(run_dir / "mlflow-read"))
    artifacts = {p.name: p.read_text() for p in Path(local).iterdir()}
    return scalars, run.data.params, artifacts, run


def assert_scalars_equal(got: dict[str, dict[int, float]], rel: float = 1e-6) -> None:
    want = expected_scalars()
    assert sorted(got) == sorted(want)
    for name, steps in want.items():
        assert sorted(got[name]) == sorted(steps), name
        for step, value in steps.items():
            assert abs(got[name][step] - value) <= rel * max(1.0, abs(value)), (name, step)
