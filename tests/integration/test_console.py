"""The console a person watches: `rayalign run` prints our lines only (the libraries' and
workers' output goes to <run_dir>/logs, one file per actor or worker), and a worker's error
still reaches the console with where it came from and the log file holding the rest.

Each run is the CLI in its own process (its own local Ray cluster), as a user runs it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.integration.cli_run import copy_stages, free_port, run_cli

pytestmark = pytest.mark.integration

MAX_LINES = 60  # the target for `make demo`; this run is smaller
# What the libraries print when their output reaches the console: log-line prefixes of vLLM,
# Ray, DeepSpeed and Python logging, Ray's "(pid=…)" prefix of worker output, Python warnings,
# Ray Data's progress lines, Ray Train's reports.
FOREIGN = re.compile(
    r"\((?:pid|\w+ pid)=\d+|\b(?:INFO|DEBUG)\b|WARNING [0-9-]+|^\[?\d{4}-\d\d-\d\d |\[DeepSpeed\]|"
    r"\bvllm\b|\bdeepspeed\b|Warning:|execution finished|Running Dataset|TrainingReport|"
    r"object store|Traceback", re.IGNORECASE | re.MULTILINE)


def test_console_shows_our_lines_and_logs_hold_the_rest(cli_round):
    _cfg, run_dir, out = cli_round  # a whole round, every tracker on; it exited 0
    lines = out.splitlines()
    assert len(lines) <= MAX_LINES, out
    assert not FOREIGN.findall(out), out
    for stage in ("prepare", "reference", "train", "evaluate"):
        assert any(f"round 0 {stage}" in line for line in lines), out
    assert "gold_gain" in out and "±" in out  # the results table with its intervals
    logs = run_dir / "logs"
    names = sorted(p.name for p in logs.iterdir())
    assert "driver.log" in names
    # one file per actor or worker, actors named after their class
    assert sum(n.startswith("RayTrainWorker-") for n in names) == 2, names
    assert any(n.startswith("Engine-") or "Engine" in n for n in names), names
    assert any(n.startswith("worker-") for n in names), names  # Ray Data's task workers
    train_logs = "".join((logs / n).read_text() for n in names if n.startswith("RayTrainWorker-"))
    vllm_logs = "".join((logs / n).read_text() for n in names if "Engine" in n)
    assert train_logs.strip() and vllm_logs.strip()  # what the console no longer shows


def test_worker_error_reaches_the_console_naming_where(cli_round, make_config, tmp_path):
    """The evaluate stage's vLLM engines cannot start: an error in an actor's constructor.
    The run starts from a copy of cli_round's finished stages, so prepare, reference and
    train are up to date and evaluate (its sampling config changed) is the stage that runs."""
    run_dir = copy_stages(cli_round[1], tmp_path / "run")
    cfg = make_config(run_dir, ray={"num_cpus": 6, "dashboard_port": free_port()}, sampling={
        "batch_size": 64, "max_tokens": 32,
        "engine": {"dtype": "float32", "max_model_len": 256,
                   "extra": {"no_such_vllm_option": 1}}})
    proc = run_cli(tmp_path, cfg)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert out.count("up to date, skipped") == 3, out
    assert "Traceback" not in out, out
    error = [line for line in out.splitlines() if line.startswith("error")]
    assert error and "round 0, stage evaluate" in error[0], out
    assert "no_such_vllm_option" in out, out
    logs = run_dir / "logs"
    named = re.search(r"from (\S+) \(pid (\d+)\): log (\S+)", out)
    assert named, out
    log_file = named.group(3)
    assert log_file.startswith(str(logs)) and os.path.isfile(log_file)
    assert "no_such_vllm_option" in Path(log_file).read_text() + (logs / "driver.log").read_text()
    assert "Traceback" in (logs / "driver.log").read_text()
