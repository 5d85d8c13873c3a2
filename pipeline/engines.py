"""The run's vLLM engines: started once, kept for the whole run, new weights loaded in place.

Two pools, each started at its first use (a run whose stages are all cached starts none):
- `policy` (config `sampling`): on-policy samples, and the evaluation of each round's policy;
- `reference` (config `reference`): reference log-probs, and the evaluation's reference.

Every request names the weights it needs (`Engines.client(role, path)`): a pool serving
other weights loads them in place first (`workers.vllm_pool.Engine.update_weights`: no
restart, prefix cache reset, a new version number), so the policy pool follows the rounds
and, with `rounds.reference: previous`, the reference pool moves between the previous
round's policy (reference stage) and the initial model (evaluation). A request for weights
of another architecture than a pool's gets a pool of its own.

Engine actors are restarted by Ray when they die (`ENGINE_RESTARTS`), the call in flight is
retried, and the restarted engine reloads the weights the call names; each start and each
weight update is a `lifecycle` row in metrics.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from pipeline.config import ActorPoolConfig, PoolConfig, RunConfig
from pipeline.manifest import stable_hash
from workers.vllm_pool import (
    ENGINE_RESTARTS,
    EngineClient,
    call_wait_s,
    get_within,
    start_wait_s,
    weights_id,
)

ROLES = {"policy": "sampling", "reference": "reference"}  # role → its pool's config section
# config.json keys that do not change the architecture (a pool serves any weights that share the rest)
NOT_ARCHITECTURE = {"_name_or_path", "name_or_path", "torch_dtype", "dtype", "transformers_version",
                    "use_cache"}


def architecture(model_path: str) -> str:
    """A digest of what an engine's model is built from (config.json, naming keys aside)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return stable_hash({k: v for k, v in config.items() if k not in NOT_ARCHITECTURE})[:16]


@dataclass
class _Pool:
    name: str
    config: PoolConfig
    actors: list[Any]
    weights_path: str
    weights: str  # weights_id of what every engine of the pool serves
    version: int


class Engines:
    """The run's engine pools (see the module docstring). `engine_cls` replaces the engine
    class (tests inject faults with a subclass)."""

    def __init__(self, cfg: RunConfig, sink: Any = None, engine_cls: type | None = None):
        import workers.vllm_pool

        self.cfg, self.sink = cfg, sink
        self.engine_cls = engine_cls or workers.vllm_pool.Engine  # looked up now (bench swaps it)
        self.pools: dict[tuple[str, str], _Pool] = {}

    def client(self, role: str, weights_path: str) -> EngineClient:
        """A client of `role`'s pool serving the weights at `weights_path` (the pool is
        started, or loads them in place, first)."""
        key = (role, architecture(weights_path))
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = self._start(role, weights_path)
        wanted = weights_id(weights_path)
        if pool.weights != wanted:
            self._update(pool, weights_path, wanted)
        return EngineClient(tuple(pool.actors), pool.weights_path, pool.weights, pool.version,
                            pool.name, call_wait_s(pool.config.engine.call_timeout_s))

    def pool_config(self, role: str) -> PoolConfig:
        return getattr(self.cfg, ROLES[role])

    def _start(self, role: str, weights_path: str) -> _Pool:
        import ray

        config = self.pool_config(role)
        name = role if not any(k[0] == role for k in self.pools) else f"{role}-{len(self.pools)}"
        remote = ray.remote(self.engine_cls).options(
            num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor,
            resources=dict(config.resources) or None, max_restarts=ENGINE_RESTARTS,
            max_task_retries=ENGINE_RESTARTS)
        actors = [remote.remote(weights_path, config.engine.model_dump(),
                                self.cfg.model.trust_remote_code, self.cfg.sampling.seed,
                                f"{name}-{i}", self.sink)
                  for i in range(config.num_actors)]
        get_within([a.ready.remote() for a in actors], start_wait_s(config.engine.call_timeout_s),
                   f"starting the {name} engines ({weights_path})")
        return _Pool(name, config, actors, weights_path, weights_id(weights_path), 0)

    def _update(self, pool: _Pool, weights_path: str, wanted: str) -> None:
        version = pool.version + 1
        get_within([a.update_weights.remote(weights_path, version) for a in pool.actors],
                   start_wait_s(pool.config.engine.call_timeout_s),
                   f"loading {weights_path} into the {pool.name} engines")
        pool.weights_path, pool.weights, pool.version = weights_path, wanted, version

    def close(self) -> None:
        import ray

        for pool in self.pools.values():
            for actor in pool.actors:
                ray.kill(actor, no_restart=True)
        self.pools.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_args(pool: ActorPoolConfig) -> dict[str, Any]:
    """map_batches arguments of the UDF tasks feeding a pool's actors (engines, scorers): as
    many at once as actors, no resources of their own (the actors hold them; a UDF only
    waits on its actor)."""
    return {"concurrency": pool.num_actors, "num_cpus": 0, "batch_size": pool.batch_size}
