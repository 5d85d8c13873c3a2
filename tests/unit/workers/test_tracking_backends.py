"""Experiment tracking: the `tracking` config section, the step axes, and each backend writing
a short run through the MetricsSink, read back with the library's own reader (offline)."""

from __future__ import annotations

import json

import pytest
import yaml
from rich.table import Table

from pipeline.config import ConfigError, parse_config
from tests.tracking_readers import (
    CONFIG,
    assert_scalars_equal,
    log_short_run,
    read_mlflow,
    read_tensorboard,
    read_wandb,
)
from workers.metrics_sink import MetricsSink
from workers.tracking import StepAxis, SummaryTable, table_data, to_point

BASE = {"model": {"policy": "org/model"}, "data": {"train": ["x.parquet"]}}
TABLE = SummaryTable("rayalign run x: evaluation on held-out data", ["metric", "round 0", "round 1"],
                     [["pairs trained", "64", "48 (+16 wait)"], ["win_rate", "0.500", "0.600"]])
WANDB_ENV = ("WANDB_MODE", "WANDB_ERROR_REPORTING", "WANDB_DATA_DIR", "WANDB_CACHE_DIR",
             "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR")


@pytest.mark.parametrize("value, backends", [
    (["mlflow"], ["mlflow"]),
    ([], []), ("tensorboard", ["tensorboard"]), (["tensorboard", "wandb"], ["tensorboard", "wandb"]),
    ({"backends": ["wandb"], "wandb_project": "p"}, ["wandb"])])
def test_tracking_config_forms(value, backends):
    assert parse_config({**BASE, "tracking": value}).tracking.backends == backends
    assert parse_config(BASE).tracking.backends == []


@pytest.mark.parametrize("value, message", [
    (["tensorboard", "comet"], "tracking.backends.1"),
    ({"backends": ["wandb"], "wandb_projekt": "p"}, "tracking.wandb_projekt: unknown key"),
    ({"backends": ["wandb"], "wandb_mode": "cloud"}, "tracking.wandb_mode"),
    (["wandb", "wandb"], "lists a tracker twice"),
])
def test_tracking_config_errors_name_the_key(value, message):
    with pytest.raises(ConfigError, match="tracking") as err:
        parse_config({**BASE, "tracking": value})
    assert message in str(err.value)


def test_global_step_continues_across_rounds():
    axis = StepAxis()
    assert [axis.global_step(0, s) for s in (1, 2, 3)] == [1, 2, 3]
    assert [axis.global_step(1, s) for s in (1, 2)] == [4, 5]
    assert axis.global_step(1, 2) == 5  # a restarted worker group repeats a step: same point
    point = to_point("train", {"step": 3, "loss": 0.5, "batch_digest": "ab",
                               "grad_norm": float("nan")}, 1, axis)
    assert (point.axis, point.step) == ("train/global_step", 6)
    assert point.values == {"train/loss": 0.5, "train/round": 1.0, "train/round_step": 3.0}
    prepare = to_point("prepare", {"split": "eval", "pairs": 16}, 0, axis)
    assert (prepare.axis, prepare.step, prepare.values) == ("prepare/round", 0,
                                                            {"prepare/eval/pairs": 16.0})


def test_table_data_reads_a_rich_table():
    table = Table(title=TABLE.title)
    for c in TABLE.columns:
        table.add_column(c)
    for row in TABLE.rows:
        table.add_row(*row)
    assert table_data(table) == TABLE


def short_run(run_dir, backends):
    sink = MetricsSink(str(run_dir / "metrics.jsonl"), {"run_dir": str(run_dir)},
                       {"backends": backends, "wandb_project": "rayalign-test"}, CONFIG)
    log_short_run(sink)
    sink.finish(TABLE)


def test_tensorboard_run_read_back(tmp_path):
    short_run(tmp_path, ["tensorboard"])
    scalars, texts = read_tensorboard(tmp_path)
    assert_scalars_equal(scalars)
    assert "name: dpo" in texts["config"] and "beta: 0.1" in texts["config"]
    assert "| win_rate | 0.500 | 0.600 |" in texts["evaluation"]
    assert (tmp_path / "metrics.jsonl").read_text().count('"kind": "train"') == 6


def test_wandb_offline_run_read_back(tmp_path, monkeypatch):
    for var in WANDB_ENV:  # the tracker sets these in its process; restore them after
        monkeypatch.setenv(var, "unset")
    secret = "wandb-key-that-must-not-leak-0123456789"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    short_run(tmp_path, ["wandb"])
    scalars, config, tables = read_wandb(tmp_path)
    assert_scalars_equal(scalars)
    assert config == CONFIG
    assert tables["evaluation"] == {"columns": TABLE.columns, "data": TABLE.rows}
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked


def test_mlflow_file_store_run_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")  # the tracker opts in; restored after
    short_run(tmp_path, ["mlflow"])
    scalars, params, artifacts, run = read_mlflow(tmp_path)
    assert_scalars_equal(scalars)
    assert params == {"run_dir": "x", "loss.name": "dpo", "loss.params.beta": "0.1"}
    assert yaml.safe_load(artifacts["config.yaml"]) == CONFIG
    assert json.loads(artifacts["evaluation.json"]) == {"columns": TABLE.columns, "data": TABLE.rows}
    assert "| win_rate | 0.500 | 0.600 |" in artifacts["evaluation.md"]
    assert (run.info.status, run.info.run_name) == ("FINISHED", tmp_path.name)


def test_no_backends_no_tracker_files(tmp_path):
    short_run(tmp_path, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
