"""The actor between the driver's train stages and the run's one worker group.

The driver submits a round's job and waits for its result; every worker asks for the next
job past the last one it trained (all ranks get the same job, in the same order), trains it,
and rank 0 hands back the result. A group that Ray Train restarts asks again and gets the
round in flight. `stop` ends the workers at their next ask (the end of the run, or an
error: then a round in flight is never trained again).

Asking waits: `next_job` and `result` return as soon as there is an answer, or None after
`wait_s` (an async actor: the waits cost no thread, and a round is handed over the moment
it is submitted, not at the next poll).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

STOP = "stop"  # what next_job answers once the run's training is over


class RoundCoordinator:
    """Ray actor (one per run's trainer). Every method is cheap or waits without work."""

    def __init__(self, sink: Any = None):
        self.sink = sink
        self.jobs: dict[int, dict[str, Any]] = {}
        self.results: dict[int, dict[str, Any]] = {}
        self.stopped = False
        self.launched_at = time.time()
        self.attempts = 0
        self._changed = asyncio.Event()  # set (and replaced) at every submit, finish, stop

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _answer(self, answer: Callable[[], Any], wait_s: float) -> Any:
        """answer() now, or once something changed, until it is not None or wait_s passed."""
        deadline = time.monotonic() + wait_s
        while (out := answer()) is None and (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                break
        return out

    def submit(self, job: dict[str, Any]) -> None:
        self.jobs[job["round_index"]] = job
        self._notify()

    async def next_job(self, after: int, wait_s: float = 0.0) -> dict[str, Any] | str | None:
        """The first submitted round past `after` that has no result yet; STOP once stopped;
        None while there is nothing to do (within `wait_s`)."""
        def answer() -> dict[str, Any] | str | None:
            if self.stopped:
                return STOP
            pending = sorted(k for k in self.jobs if k > after and k not in self.results)
            return self.jobs[pending[0]] if pending else None

        return await self._answer(answer, wait_s)

    def finish(self, round_index: int, result: dict[str, Any]) -> None:
        self.results[round_index] = result
        self.jobs.pop(round_index, None)  # its dataset is no longer needed
        self._notify()

    async def result(self, round_index: int, wait_s: float = 0.0) -> dict[str, Any] | None:
        """Round `round_index`'s result, once rank 0 handed it back (None within `wait_s`).
        The references to the round's weights in the object store (`weights`, if any) go to
        the first asker only: kept here, they would keep every round's weights alive."""
        out = await self._answer(lambda: self.results.get(round_index), wait_s)
        if out is not None and "weights" in out:
            self.results[round_index] = {k: v for k, v in out.items() if k != "weights"}
        return out

    def in_flight(self) -> bool:
        """Is a submitted round still without its result?"""
        return bool(self.jobs)

    def stop(self) -> None:
        self.stopped = True
        self._notify()

    def started(self, workers: int, setup_s: float, zero_stage: int, threads: int) -> int:
        """Rank 0 of a worker group is ready to train (model loaded, DeepSpeed built, at ZeRO
        stage `zero_stage`, torch using `threads` CPU threads): record the start as a
        `lifecycle` row. The first start counts
        from the fit's launch (the group's placement, processes and process group too); a
        restart from its workers' entry into the training function."""
        self.attempts += 1
        seconds = time.time() - self.launched_at if self.attempts == 1 else setup_s
        if self.sink is not None:
            self.sink.log.remote("lifecycle", {"event": "trainer_start", "workers": workers,
                                               "zero_stage": zero_stage,
                                               "torch_threads": threads,
                                               "seconds": round(seconds, 3),
                                               "attempt": self.attempts})
        return self.attempts
