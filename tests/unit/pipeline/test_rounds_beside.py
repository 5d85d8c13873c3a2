"""pipeline.dag._rounds runs a round's evaluation beside the next round's stages, up to the
next round's own evaluation (and, with `rounds.reference: previous`, up to its reference
stage). The stages here are stand-ins that record what ran when and meet by rendezvous
(events with a deadline), not by timings: in a serial driver the evaluation waiting for the
next round's stage could not see it start, and the test fails."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from pipeline import dag
from pipeline.config import parse_config

BASE = {"model": {"policy": "m"}, "data": {"train": ["d.parquet"], "eval": ["e.parquet"]},
        "loss": {"name": "sigmoid", "params": {"beta": 0.1}},
        "reward": {"kind": "function", "function": "pipeline.toy.reward:toy_gold_rewards"}}
MEET_S = 20  # a rendezvous deadline, far beyond what a stand-in stage takes


class Script:
    """Stand-in stages: each appends (event, round, stage) to `log`; `hooks[(round, stage)]`
    runs inside that stage (to wait for another, or to fail)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, str]] = []
        self.lock = threading.Lock()
        self.started: dict[tuple[int, str], threading.Event] = {}
        self.hooks: dict[tuple[int, str], Any] = {}

    def event(self, k: int, name: str) -> threading.Event:
        with self.lock:
            return self.started.setdefault((k, name), threading.Event())

    def stage(self, name: str) -> dag.Stage:
        def key_inputs(r: dag.Round) -> dict[str, Any]:
            return {"round": r.index, "stage": name}

        def run(r: dag.Round, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
            with self.lock:
                self.log.append(("start", r.index, name))
            self.event(r.index, name).set()
            extra = self.hooks.get((r.index, name), dict)() or {}
            with self.lock:
                self.log.append(("end", r.index, name))
            if name == "train":
                return {"model_dir": str(out / "model"), "model_digest": f"digest-{r.index}",
                        "num_pairs": 0}
            return {"name": name, **extra}

        return dag.Stage(name, key_inputs, run)

    def at(self, event: str, k: int, name: str) -> int:
        return self.log.index((event, k, name))

    def wait_for(self, k: int, name: str) -> dict[str, bool]:
        """A hook: wait until stage `name` of round `k` has started (or the deadline)."""
        return lambda: {"met": self.event(k, name).wait(MEET_S)}


@pytest.fixture
def script(monkeypatch) -> Script:
    s = Script()
    monkeypatch.setattr(dag, "OFFLINE_ROUND", [s.stage(n) for n in
                                               ("prepare", "reference", "train", "evaluate")])
    monkeypatch.setattr(dag, "SAMPLED_ROUND", [s.stage(n) for n in
                                               ("prepare", "sample", "score", "pair",
                                                "reference", "train", "evaluate")])
    return s


def run_rounds(tmp_path: Path, count: int = 3, reference: str = "initial") -> list[dag.Round]:
    cfg = parse_config({**BASE, "run_dir": str(tmp_path / "run"),
                        "rounds": {"count": count, "mode": "online", "reference": reference}})
    dag.log_dir_of(tmp_path / "run").mkdir(parents=True, exist_ok=True)  # (run_pipeline's)
    return dag._rounds(cfg, tmp_path / "run", {}, None, None, None, None, False)


def test_an_evaluation_runs_beside_the_next_rounds_stages_up_to_its_evaluation(script, tmp_path):
    # round 0's evaluation waits until round 1 trains: sample..train ran while it ran
    script.hooks[(0, "evaluate")] = script.wait_for(1, "train")
    script.hooks[(1, "evaluate")] = script.wait_for(2, "train")
    rounds = run_rounds(tmp_path)
    for k in (0, 1):
        assert rounds[k].done["evaluate"].outputs["met"], f"round {k}'s evaluation ran alone"
        # the next round's evaluation loads that round's policy: it waits
        assert script.at("start", k + 1, "evaluate") > script.at("end", k, "evaluate")
    assert script.at("start", 2, "evaluate") > script.at("end", 2, "train")  # the last, alone
    assert [r.index for r in rounds] == [0, 1, 2] and all("evaluate" in r.done for r in rounds)

    # run again: every stage is up to date, nothing runs, and each says so on the driver's
    # thread (rich captures one thread's output: what `rayalign resume` tests read)
    ran = len(script.log)
    with dag.console.capture() as captured:
        run_rounds(tmp_path)
    assert len(script.log) == ran
    assert captured.get().count("up to date, skipped") == 4 + 2 * 6  # prepare runs once


def test_with_reference_previous_the_reference_stage_waits_for_the_evaluation(script, tmp_path):
    """The reference stage loads the previous round's policy into the reference engines,
    which that round's evaluation holds to the initial model."""
    def evaluation():
        met = script.event(1, "pair").wait(MEET_S)
        # a second for a reference stage that does not wait to start: here it cannot
        return {"met": met, "reference_meanwhile": script.event(1, "reference").wait(1.0)}

    script.hooks[(0, "evaluate")] = evaluation
    rounds = run_rounds(tmp_path, count=2, reference="previous")
    assert rounds[0].done["evaluate"].outputs["met"]
    assert not rounds[0].done["evaluate"].outputs["reference_meanwhile"]
    assert script.at("start", 1, "reference") > script.at("end", 0, "evaluate")


def test_a_failed_evaluation_beside_fails_the_run(script, tmp_path):
    def boom():
        script.event(1, "sample").wait(MEET_S)
        raise RuntimeError("evaluation failed")

    script.hooks[(0, "evaluate")] = boom
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_rounds(tmp_path)
    assert ("start", 1, "evaluate") not in script.log and ("start", 2, "sample") not in script.log
    assert "[round 0] evaluate failed" in (tmp_path / "run" / "logs" / "driver.log").read_text()


def test_a_failed_stage_waits_for_the_evaluation_beside_it(script, tmp_path):
    """The driver does not leave (and close the engines) under a running evaluation: it
    ends, its result is kept, and a resumed run skips it."""
    done = threading.Event()

    def fail():
        raise RuntimeError("sampling failed")

    def slow_evaluation():
        script.event(1, "sample").wait(MEET_S)
        done.wait(0.5)  # still running when the sample stage fails
        return {"finished": True}

    script.hooks[(1, "sample")] = fail
    script.hooks[(0, "evaluate")] = slow_evaluation
    with pytest.raises(RuntimeError, match="sampling failed"):
        run_rounds(tmp_path)
    assert script.log[-1] == ("end", 0, "evaluate")  # it ended before the driver raised
    del script.hooks[(1, "sample")]
    run_rounds(tmp_path)
    assert script.log.count(("start", 0, "evaluate")) == 1  # kept: not redone
