"""The driver's live training line: the MetricsSink's progress and its rendering (Ray-free)."""

from pipeline.console import train_detail
from workers.metrics_sink import MetricsSink


def test_sink_progress_is_the_latest_row_of_the_round(tmp_path, monkeypatch):
    sink = MetricsSink(str(tmp_path / "metrics.jsonl"), {"run_dir": str(tmp_path)})
    sink.set_context(round=0, stage="train")
    sink.plan("train", 10, 0.1)
    assert sink.progress("train", 0) == {"step": None, "total": 10}
    clock = iter([100.0, 102.0, 104.0])
    monkeypatch.setattr("workers.metrics_sink.time.time", lambda: next(clock))
    for step in (1, 2, 3):
        sink.log("train", {"step": step, "loss": 0.5 / step, "rewards/margins": 0.1 * step})
    state = sink.progress("train", 0)
    assert (state["step"], state["total"], state["steps_per_s"]) == (3, 10, 0.5)
    assert state["loss"] == 0.5 / 3
    assert sink.progress("train", 1)["step"] is None  # the next round has not stepped yet
    assert train_detail(state) == "3/10 steps · 0.50/s · ETA 0:14 · loss 0.167 · margin 0.300"


def test_train_detail_without_a_rate():
    assert train_detail({"step": 1, "total": None, "steps_per_s": None}) == "1/? steps"


def test_a_console_written_to_a_file_is_wide_enough_for_the_summary_tables():
    """Not a terminal (nohup, a sweep's run, CI): 160 columns, not rich's 80, which cut the
    sweep's table to 'na…' cells; COLUMNS still decides when it is set."""
    import os
    import subprocess
    import sys

    code = "from pipeline.console import console; print(console.width)"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "160"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "COLUMNS": "100"}, check=True)
    assert out.stdout.strip() == "100"
