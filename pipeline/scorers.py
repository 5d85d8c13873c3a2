"""The run's reward actors: a reward model or a judge, started once and kept for the run.

`reward.kind: reward_model | judge` loads a model into each scorer actor. Starting a
scorer actor every round cost 10-25 s of a small online round before any model was loaded
(bench/RESULTS.md, the per-stage design's score stage), so like the vLLM
engines (pipeline.engines) they start at their first use and live until the run ends. The
score stage feeds them through Ray Data: `ScorerClient` is a thin UDF, run in tasks, that
sends each batch (or a judge's prompt group) to one of the actors. A reward function
(`kind: function`) keeps no state and needs no actor (pipeline.stages.score).

Scorer actors are restarted by Ray when they die (`ENGINE_RESTARTS`) and the call in flight
is retried; each start is a `lifecycle` row in metrics.jsonl.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Self

from pipeline.config import RunConfig
from workers.vllm_pool import ENGINE_RESTARTS, call_wait_s, get_within, start_wait_s


@dataclass(frozen=True)
class ScorerClient:
    """A Ray Data UDF (a callable object: it runs in tasks) scoring each batch on one of the
    run's scorer actors, drawn at random; `timeout_s` is the backstop of a call that never
    answers (restarts included)."""

    actors: tuple[Any, ...]
    timeout_s: float
    __name__ = "ScorerClient"  # Ray Data's map_groups names its task after the UDF's __name__

    def __call__(self, batch: Any) -> Any:
        i = int.from_bytes(os.urandom(2), "big") % len(self.actors)
        return get_within(self.actors[i].score.remote(batch), self.timeout_s,
                          f"scorer {i} (restarts included)")


class Scorers:
    """The run's scorer actors (see the module docstring)."""

    def __init__(self, cfg: RunConfig, sink: Any = None):
        self.cfg, self.sink = cfg, sink
        self.actors: list[Any] = []

    def client(self) -> ScorerClient:
        """The client of the run's scorers (started first if they are not)."""
        if not self.actors:
            self._start()
        return ScorerClient(tuple(self.actors), call_wait_s(self.cfg.sampling.engine.call_timeout_s))

    def _start(self) -> None:
        import ray

        from workers.rewards import JudgeScorer, RewardModelScorer

        reward, t0 = self.cfg.reward, time.perf_counter()
        if reward.kind == "reward_model":
            cls, args = RewardModelScorer, (reward.model, self.cfg.model.trust_remote_code)
        elif reward.kind == "judge":
            cls, args = JudgeScorer, (reward.model, self.cfg.sampling.engine.model_dump(),
                                      self.cfg.model.trust_remote_code)
        else:
            raise ValueError(f"reward.kind {reward.kind!r} has no scorer actors")
        remote = ray.remote(cls).options(
            num_cpus=reward.cpus_per_actor, num_gpus=reward.gpus_per_actor,
            resources=dict(reward.resources) or None, max_restarts=ENGINE_RESTARTS,
            max_task_retries=ENGINE_RESTARTS)
        actors = [remote.remote(*args) for _ in range(reward.num_actors)]
        get_within([a.ready.remote() for a in actors],
                   start_wait_s(self.cfg.sampling.engine.call_timeout_s),
                   f"starting the {reward.kind} scorers ({reward.model})")
        self.actors = actors
        if self.sink is not None:
            self.sink.log.remote("lifecycle", {"event": "scorer_start", "pool": reward.kind,
                                               "actors": len(actors),
                                               "seconds": time.perf_counter() - t0})

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
