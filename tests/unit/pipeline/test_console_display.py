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
