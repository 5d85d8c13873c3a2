"""The progress board and the stall report, without Ray (the board is a plain class; the
real workers' watchdog is exercised in tests/integration/test_train_robustness.py)."""

from __future__ import annotations

import time

import pytest

from workers.losses import LossInputError
from workers.watchdog import ProgressBoard, is_permanent, stall_message


@pytest.mark.parametrize("err, permanent", [
    (LossInputError("loss 'kto': needs batch field(s) ['kl']"), True),
    (ValueError("bad row"), True),
    (KeyError("ref_chosen_logp"), True),
    (TypeError("x"), True),
    (RuntimeError("[gloo] Timed out waiting 75000ms for recv operation"), False),
    (ConnectionResetError("peer gone"), False),
    (MemoryError(), False),
])
def test_which_errors_a_retry_would_repeat(err, permanent):
    assert is_permanent(err) is permanent


def test_board_reports_silent_workers_once_and_not_after_they_leave():
    board = ProgressBoard("train", 2, timeout_s=0.05)
    board.register("rank 0", "handle-0", pid=10, node="n")
    board.register("rank 1", "handle-1", pid=11, node="n")
    board.beat("rank 0", 3, "forward", time.time())
    board.leave("rank 1")  # ended normally: its silence is no stall
    time.sleep(0.1)
    assert board.silent() == [("rank 0", "handle-0")]
    assert board.silent() == []  # each worker once
    summary = board.summary()
    assert summary["stalls"][0]["who"] == "rank 0" and summary["stalls"][0]["step"] == 3
    assert summary["starts"] == {"rank 0": 1, "rank 1": 1}


def test_the_first_permanent_error_is_kept():
    board = ProgressBoard("train", 0, timeout_s=60)
    board.report_permanent("rank 1", 1, "LossInputError: needs ref", "tb1")
    board.report_permanent("rank 0", 1, "RuntimeError: peer died", "tb0")
    assert board.get_permanent()["who"] == "rank 1"


def test_stall_message_names_stage_round_step_phase_ranks_and_stack():
    board = ProgressBoard("train", 1, timeout_s=60)
    board.register("rank 0", None, pid=10, node="n")
    board.register("rank 1", None, pid=11, node="n")
    board.beat("rank 0", 9, "forward", time.time())
    board.beat("rank 1", 9, "data", time.time() - 200)
    board.report_stall("rank 1", 9, "data", 200.0,
                       'File "workers/recipe/recipe.py", line 280, in train_round\n    inject_stall(...)\n')
    message = stall_message(board.summary())
    assert message.startswith("train stage, round 1: rank 1 made no progress for 200.0 s at"
                              " step 9 (phase 'data')")
    assert "rank 0 step 9 phase 'forward'" in message and "pid 11" in message
    assert "where rank 1 was stuck:" in message and "workers/recipe/recipe.py" in message
