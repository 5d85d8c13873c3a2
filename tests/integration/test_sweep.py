"""`rayalign sweep` end to end, as a user runs it: two runs side by side on one local Ray
cluster (real engines, Ray Data, Ray Train + DeepSpeed), one reference cache between them,
the report, and the sweep run again (its arms in another order) finding every stage done."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile

import yaml

from pipeline.manifest import Manifest
from pipeline.metrics import read_metrics
from tests.integration.cli_run import free_port


def _sweep(config, sweep_dir, *grid):
    ray_temp = tempfile.mkdtemp(prefix="ra-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAYALIGN_RAY_TEMP_DIR": ray_temp, "COLUMNS": "200"}
    try:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", str(config), *grid,
                               "--sweep-dir", str(sweep_dir)], capture_output=True, text=True,
                              env=env, timeout=1200, check=False)
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


def _span(run_dir):
    times = [r["time"] for r in read_metrics(run_dir / "metrics.jsonl")]
    return min(times), max(times)


def test_a_sweep_runs_its_grid_side_by_side_and_reports(make_config, tmp_path):
    # a run holds reference 1 + policy 1 + trainer 2 × 0.5 + 1 for Ray Data: two fit in 8
    cfg = make_config(tmp_path / "base", reference={"cache_dir": None},
                      train={"cpus_per_worker": 0.5},
                      ray={"num_cpus": 8, "dashboard_port": free_port()})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    sweep_dir = tmp_path / "sweep"
    proc = _sweep(config, sweep_dir, "loss.name=sigmoid,ipo", "loss.params={beta: 0.1}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    names = ["00_name=sigmoid", "01_name=ipo"]
    assert "2 running, 0 waiting" in out and "2 of 2 runs finished" in out, out
    runs = [sweep_dir / n for n in names]
    for run, loss in zip(runs, ["sigmoid", "ipo"]):
        assert yaml.safe_load((run / "config.yaml").read_text())["loss"]["name"] == loss
        assert Manifest.read(run / "round-0" / "evaluate") is not None
    # side by side: each ran while the other did
    (a0, a1), (b0, b1) = _span(runs[0]), _span(runs[1])
    assert a0 < b1 and b0 < a1, ((a0, a1), (b0, b1))
    # one reference cache: the same reference and data were computed once
    hits = sorted(Manifest.read(r / "round-0" / "reference").outputs["cache_hit"] for r in runs)
    assert hits == [False, True]
    assert all(Manifest.read(r / "round-0" / "reference").outputs["train"].startswith(
        str(sweep_dir / "cache" / "reference")) for r in runs)
    # the report: a row per arm, the comparison, the plots, a row per run in the csv
    report = (sweep_dir / "report" / "report.md").read_text()
    assert "| name=sigmoid | 1 | 0 |" in report and "| name=ipo | 1 | 0 |" in report
    assert "- name=ipo vs name=sigmoid (16 prompts): gold gain" in report and "KL" in report
    assert "name=ipo vs name=sigmoid (16 prompts): gold gain" in out  # and on the console
    for png in ("metric_vs_kl.png", "metric_vs_step.png"):
        assert (sweep_dir / "report" / png).stat().st_size > 10_000
    with (sweep_dir / "report" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == names
    for r, run in zip(rows, runs):
        last = [m for m in read_metrics(run / "metrics.jsonl") if m.get("kind") == "eval"][-1]
        assert float(r["eval/gold_gain"]) == last["eval/gold_gain"]
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["status"] for r in state["runs"]] == ["done", "done"]

    # the same sweep again, its arms in the other order: each run is found by its config in
    # its directory (not by its new name, 00_name=ipo) and every stage is found done
    proc = _sweep(config, sweep_dir, "loss.name=ipo,sigmoid", "loss.params={beta: 0.1}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name[:2].isdigit()) == names
    for run in runs:
        log = (run / "console.log").read_text().split("Ray dashboard:")[-1]
        for stage in ("prepare", "reference", "train", "evaluate"):
            assert f"round 0 {stage}: up to date, skipped" in log, log
    again = (sweep_dir / "report" / "report.md").read_text()
    assert "- name=sigmoid vs name=ipo (16 prompts): gold gain" in again, again
    assert [r["name"] for r in json.loads((sweep_dir / "sweep.json").read_text())["runs"]] == \
        names[::-1]
