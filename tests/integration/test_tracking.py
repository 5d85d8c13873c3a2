"""Every tracker at once behind a real MetricsSink actor: train rows come from another Ray
worker process (as the rank-0 train worker sends them), prepare/eval rows and the final table
from the driver (as pipeline/dag.py does); each run is read back with its library's reader."""

from __future__ import annotations

import json
import math
import os

import pytest
from rich.table import Table

from tests.tracking_readers import (
    CONFIG,
    EVAL,
    PREPARE,
    TRAIN,
    assert_scalars_equal,
    read_mlflow,
    read_tensorboard,
    read_wandb,
)

pytestmark = pytest.mark.integration


def test_ray_sink_feeds_every_tracker(ray_cluster, tmp_path):
    import ray

    from pipeline.config import parse_config
    from workers.metrics_sink import MetricsSink
    from workers.tracking import table_data

    cfg = parse_config({"run_dir": str(tmp_path), "model": {"policy": "org/model"},
                        "data": {"train": ["x.parquet"]},
                        "tracking": ["tensorboard", "mlflow", "wandb"]})
    secret = "wandb-key-that-must-not-leak-9876543210"
    env = {"WANDB_API_KEY": secret, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    sink = ray.remote(MetricsSink).options(num_cpus=0, runtime_env={"env_vars": env}).remote(
        str(tmp_path / "metrics.jsonl"), {"run_dir": str(tmp_path)},
        cfg.tracking.model_dump(), CONFIG)
    assert ray.get(sink.__ray_call__.remote(lambda _: os.environ["WANDB_API_KEY"])) == secret

    @ray.remote(num_cpus=0)
    def train_worker(sink, rows):  # another process, like the rank-0 Ray Train worker
        ray.get([sink.log.remote("train", row) for row in rows])

    ray.get(sink.set_context.remote(round=0, stage="prepare"))
    ray.get([sink.log.remote("prepare", row) for row in PREPARE])
    for r in (0, 1):
        ray.get(sink.set_context.remote(round=r, stage="train"))
        ray.get(train_worker.remote(sink, TRAIN[r]))
        ray.get(sink.set_context.remote(round=r, stage="evaluate"))
        ray.get(sink.log.remote("eval", EVAL[r]))
    table = Table(title="evaluation")
    for column in ("metric", "round 0", "round 1"):
        table.add_column(column)
    table.add_row("win_rate", "0.500", "0.600")
    ray.get(sink.finish.remote(table_data(table)))
    ray.kill(sink)

    tb_scalars, texts = read_tensorboard(tmp_path)
    assert_scalars_equal(tb_scalars)
    assert "| win_rate | 0.500 | 0.600 |" in texts["evaluation"]
    ml_scalars, _, artifacts, _ = read_mlflow(tmp_path)
    assert_scalars_equal(ml_scalars)
    assert "| win_rate | 0.500 | 0.600 |" in artifacts["evaluation.md"]
    wb_scalars, config, tables = read_wandb(tmp_path)
    assert_scalars_equal(wb_scalars)
    assert config == CONFIG
    assert tables["evaluation"]["data"] == [["win_rate", "0.500", "0.600"]]
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked


def test_run_pipeline_tracks_what_metrics_jsonl_holds(cli_round):
    """A whole offline round (`rayalign run`) with `tracking: [tensorboard, mlflow, wandb]`:
    every finite number of every metrics.jsonl row is in every tracker at its step, and so is
    the final table."""
    from workers.metrics_sink import EVENT_KINDS
    from workers.tracking import StepAxis, to_point

    _cfg, run_dir, _ = cli_round
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"prepare", "train", "eval", "lifecycle"} <= {r["kind"] for r in rows}
    rows = [r for r in rows if r["kind"] not in EVENT_KINDS]  # events stay in metrics.jsonl
    tb_scalars, texts = read_tensorboard(run_dir)
    wb_scalars, config, tables = read_wandb(run_dir)
    ml_scalars = read_mlflow(run_dir)[0]
    axis, checked = StepAxis(), 0
    for row in rows:
        kind, round_index = row.pop("kind"), row.get("round") or 0
        point = to_point(kind, {k: v for k, v in row.items() if k not in ("time", "run_dir",
                                                                          "stage")},
                         round_index, axis)
        for name, value in point.values.items():
            for scalars in (tb_scalars, wb_scalars, ml_scalars):
                assert math.isclose(scalars[name][point.step], value, rel_tol=1e-6), name
            checked += 1
    assert checked > 10 * sum(row.get("step") is not None for row in rows) > 0  # train rows
    assert config["loss"]["name"] == "principled" and config["run_dir"] == str(run_dir)
    assert "eval/kl" in tb_scalars and "train/loss" in wb_scalars
    assert texts["evaluation"].count("\n") >= 3 and tables["evaluation"]["columns"] == [
        "metric", "round 0"]
