"""The summary's count of what a driver session started and loaded (pipeline.metrics)."""

from pipeline.metrics import lifecycle_line


def test_counts_this_sessions_events_only():
    rows = [{"kind": "lifecycle", "time": 5.0, "event": "engine_start", "restarted": False},
            {"kind": "lifecycle", "time": 10.0, "event": "engine_start", "restarted": False},
            {"kind": "lifecycle", "time": 11.0, "event": "engine_start", "restarted": True},
            {"kind": "lifecycle", "time": 12.0, "event": "weight_update", "seconds": 0.25},
            {"kind": "lifecycle", "time": 13.0, "event": "weight_update", "seconds": 0.5,
             "via": "object_store"},
            {"kind": "lifecycle", "time": 14.0, "event": "trainer_start"},
            {"kind": "train", "time": 15.0, "event": "engine_start"}]
    assert lifecycle_line(rows, since=10.0) == (
        "engines: 2 started (1 restarts), 2 weight updates (0.75 s, 1 from the trainer's"
        " memory); trainer: 1 start")
    assert lifecycle_line(rows).startswith("engines: 3 started")
    assert lifecycle_line([]) == "engines: 0 started, 0 weight updates (0.00 s); trainer: 0 starts"


def test_scorer_actors_are_counted_when_the_reward_has_them():
    rows = [{"kind": "lifecycle", "time": 1.0, "event": "scorer_start", "pool": "judge",
             "actors": 2, "seconds": 9.0},
            {"kind": "lifecycle", "time": 2.0, "event": "trainer_start", "zero_stage": 0}]
    assert lifecycle_line(rows) == ("engines: 0 started, 0 weight updates (0.00 s);"
                                    " trainer: 1 start (ZeRO-0); scorers: 2 started")
