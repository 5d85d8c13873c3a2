"""A stuck run is never silent: progress beats, a watchdog in each worker, a board the driver reads.

Each Ray Train worker (and each engine actor) marks its progress with `Watchdog.progress(step,
phase)` at every phase boundary; a daemon thread sends the latest mark to the run's
`ProgressBoard` actor every few seconds (a beat: "alive, last progressed at ..."). When a
worker makes no progress for `timeout_s` (a collective that does not return, an engine call
that never answers), its watchdog records where it is (stage, round, step, phase and the
main thread's stack) on the board and ends the process, so Ray Train's failure handling
(`max_failures`, checkpoints) or the actor pool's restart applies. A worker that stops
beating altogether (frozen) is found by the driver's `watch_board`, which kills its actor.

Errors that would repeat on a retry (our own checks: a loss missing an input, bad config or
data) are recorded on the board as permanent: a restarted group sees the record and ends at
once, and the driver raises the recorded message, so the run fails once with it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

STALL_EXIT_CODE = 75  # the exit status of a worker its watchdog ended


class TrainingStalled(RuntimeError):
    """A worker made no progress within the stall timeout (and retries, if any, ran out)."""


class PermanentError(RuntimeError):
    """An error recorded on the board as one that a retry would repeat. `starts`: how many
    times each worker started training (1: it was not retried)."""

    def __init__(self, message: str, starts: dict[str, int] | None = None):
        super().__init__(message)
        self.starts = starts or {}


def is_permanent(err: BaseException) -> bool:
    """Whether a retry would raise `err` again: errors of our checks and plain Python bugs
    are; faults (a dead peer, a timed-out or aborted collective, I/O, memory) are not."""
    from workers.losses import LossInputError

    if isinstance(err, LossInputError):
        return True
    if isinstance(err, (RuntimeError, OSError, MemoryError, KeyboardInterrupt, SystemExit)):
        return False
    return isinstance(err, Exception)


@dataclass
class Mark:
    """Where one worker is: its step and phase, and when it last moved."""

    who: str
    step: int = 0
    phase: str = "start"
    progressed_at: float = field(default_factory=time.time)
    beat_at: float = field(default_factory=time.time)
    pid: int = 0
    node: str = ""


class ProgressBoard:
    """Ray actor (one per run's trainer, or per pool): the latest mark of every worker, stall
    reports and permanent errors. Methods are cheap; workers call them fire-and-forget."""

    def __init__(self, stage: str, round_index: int, timeout_s: float):
        self.stage, self.round, self.timeout_s = stage, round_index, timeout_s
        self.marks: dict[str, Mark] = {}
        self.handles: dict[str, Any] = {}
        self.stalls: list[dict[str, Any]] = []
        self.permanent: dict[str, Any] | None = None
        self.starts: dict[str, int] = {}  # how many times each worker started (restarts + 1)

    def register(self, who: str, handle: Any, pid: int, node: str) -> None:
        self.marks[who] = Mark(who, pid=pid, node=node)
        self.handles[who] = handle
        self.starts[who] = self.starts.get(who, 0) + 1

    def set_round(self, round_index: int) -> None:
        """A long-lived group's next round (the stage's reports name it)."""
        self.round = round_index

    def live(self) -> list[Any]:
        """The actor handles of the workers that have not ended."""
        return list(self.handles.values())

    def beat(self, who: str, step: int, phase: str, progressed_at: float) -> None:
        mark = self.marks.setdefault(who, Mark(who))
        mark.step, mark.phase, mark.progressed_at, mark.beat_at = (step, phase, progressed_at,
                                                                   time.time())

    def leave(self, who: str) -> None:
        """A worker ended (returned or raised): its silence from now on is no stall."""
        self.handles.pop(who, None)

    def report_stall(self, who: str, step: int, phase: str, seconds: float, stack: str) -> None:
        self.handles.pop(who, None)  # it ends itself
        self.stalls.append({"who": who, "round": self.round, "step": step, "phase": phase,
                            "seconds": round(seconds, 1), "stack": stack, "time": time.time()})

    def report_permanent(self, who: str, step: int, error: str, tb: str) -> None:
        if self.permanent is None:  # the first one is the cause; others follow from it
            self.permanent = {"who": who, "step": step, "error": error, "traceback": tb}

    def get_permanent(self) -> dict[str, Any] | None:
        return self.permanent

    def silent(self) -> list[tuple[str, Any]]:
        """Workers whose beats stopped for longer than the timeout (frozen or gone), with
        their actor handles; each is returned once."""
        now, out = time.time(), []
        for who, mark in list(self.marks.items()):
            if now - mark.beat_at > self.timeout_s and who in self.handles:
                out.append((who, self.handles[who]))
                self.report_stall(who, mark.step, mark.phase, now - mark.beat_at,
                                  "(no beats: the process is frozen or gone)")
        return out

    def summary(self) -> dict[str, Any]:
        now = time.time()
        return {"stage": self.stage, "round": self.round, "stalls": self.stalls,
                "permanent": self.permanent, "starts": dict(self.starts),
                "marks": {w: {"step": m.step, "phase": m.phase,
                              "idle_s": round(now - m.progressed_at, 1), "pid": m.pid,
                              "node": m.node} for w, m in sorted(self.marks.items())}}


def stall_message(summary: dict[str, Any]) -> str:
    """What a person needs from a stall: stage, round, and where each worker was."""
    head = f"{summary['stage']} stage, round {summary['round']}"
    lines = []
    for s in summary["stalls"]:
        lines.append(f"{s['who']} made no progress for {s['seconds']} s at step {s['step']}"
                     f" (phase {s['phase']!r})")
    lines.append("last progress of every worker: " + "; ".join(
        f"{w} step {m['step']} phase {m['phase']!r} ({m['idle_s']} s ago, pid {m['pid']})"
        for w, m in summary["marks"].items()))
    for s in summary["stalls"]:
        if "File " in s["stack"]:
            lines.append(f"where {s['who']} was stuck:\n{s['stack'].rstrip()}")
    return f"{head}: " + "\n  ".join(lines)


class Watchdog:
    """In a worker: `progress(step, phase)` marks progress; a daemon thread beats to the
    board (if any) and, after `timeout_s` without progress while armed, reports the stall
    and ends the process. `idle()` disarms it (an engine waiting for work is not stuck);
    the next `progress` arms it again."""

    def __init__(self, who: str, timeout_s: float, board: Any = None,
                 beat_s: float | None = None):
        import ray

        self.board, self.who, self.timeout_s = board, who, timeout_s
        self.beat_s = beat_s or max(0.5, min(5.0, timeout_s / 10))
        self.step, self.phase, self.progressed_at, self.armed = 0, "start", time.time(), True
        self.phase_timeout_s = timeout_s
        self._main = threading.get_ident()  # the thread that works (Ray Train V2 runs it apart)
        self._stop = threading.Event()
        if board is not None:
            handle = ray.get_runtime_context().current_actor
            node = ray.get_runtime_context().get_node_id()
            ray.get(board.register.remote(who, handle, os.getpid(), node), timeout=60)
        self._thread = threading.Thread(target=self._run, name=f"watchdog-{who}", daemon=True)
        self._thread.start()

    def progress(self, step: int, phase: str, timeout_s: float | None = None) -> None:
        """Mark progress; `timeout_s` allows this phase longer than the default (setup)."""
        self.step, self.phase, self.progressed_at, self.armed = step, phase, time.time(), True
        self.phase_timeout_s = timeout_s or self.timeout_s
        self._main = threading.get_ident()  # the thread to dump if it gets stuck here

    def idle(self) -> None:
        self.armed, self.phase = False, "idle"

    def close(self) -> None:
        self._stop.set()
        if self.board is not None:
            self.board.leave.remote(self.who)

    def _stack(self) -> str:
        """The watched thread's stack: where it is stuck."""
        frame = sys._current_frames().get(self._main)
        return "".join(traceback.format_stack(frame)[-12:]) if frame is not None else ""

    def _run(self) -> None:
        import ray

        while not self._stop.wait(self.beat_s):
            if self.board is not None:
                self.board.beat.remote(self.who, self.step, self.phase,
                                       self.progressed_at if self.armed else time.time())
            idle = time.time() - self.progressed_at
            if self.armed and idle > self.phase_timeout_s and not self._stop.is_set():
                stack = self._stack()
                print(f"rayalign watchdog: {self.who} made no progress for {idle:.0f} s at"
                      f" step {self.step} (phase {self.phase!r}); ending this process so the"
                      f" run's failure handling applies. It was here:\n{stack}",
                      file=sys.stderr, flush=True)
                try:
                    if self.board is not None:
                        ray.get(self.board.report_stall.remote(self.who, self.step, self.phase,
                                                               idle, stack), timeout=30)
                        # Peers stuck with it (the rank that stopped, or one waiting on it in a
                        # collective) pass their timeouts within a beat of this one: once this
                        # process ends, Ray Train ends them, so they get two beats to report
                        # where they are first, or the report would name only the first to fire.
                        time.sleep(2 * self.beat_s)
                finally:
                    os._exit(STALL_EXIT_CODE)


def watch_board(board: Any, done: threading.Event, poll_s: float) -> None:
    """Driver side, in a thread beside a blocking call: kill the actor of every worker whose
    beats stopped (a frozen process cannot end itself), until `done` is set."""
    import ray

    while not done.wait(poll_s):
        try:
            silent = ray.get(board.silent.remote(), timeout=60)
        except ray.exceptions.RayError:  # the board is gone or busy: the run is ending
            continue
        for _who, handle in silent:
            with contextlib.suppress(ray.exceptions.RayError):  # already gone
                ray.kill(handle, no_restart=False)


STALL_ENV = "RAYALIGN_INJECT_STALL"


def inject_stall(rank: int, step: int) -> None:
    """Fault injection for tests: with ``RAYALIGN_INJECT_STALL=RANK:STEP[:MARKER]`` in a
    worker's environment, that rank stops before its first micro-batch of optimizer step STEP
    and never moves again, as a rank stuck outside a collective does (its peers then wait in
    one). With MARKER (a file path) it stalls only while the file does not exist yet, and
    creates it: the restarted group then runs through."""
    spec = os.environ.get(STALL_ENV)
    if not spec:
        return
    want_rank, want_step, *marker = spec.split(":", 2)
    if (int(want_rank), int(want_step)) != (rank, step):
        return
    if marker:
        if os.path.exists(marker[0]):
            return
        with open(marker[0], "w") as f:
            f.write(f"rank {rank} stalled at step {step}\n")
    while True:
        time.sleep(3600)
