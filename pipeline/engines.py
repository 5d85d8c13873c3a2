"""The run's vLLM engines: started once, kept for the whole run, new weights loaded in place.

Two pools, each started at its first use (a run whose stages are all cached starts none):
- `policy` (config `sampling`): on-policy samples, and the evaluation of each round's policy;
- `reference` (config `reference`): reference log-probs, and the evaluation's reference.

Every request names the weights it needs (`Engines.client(role, path)`): a pool serving
other weights loads them in place first (`workers.vllm_pool.Engine.update_weights`: no
restart, prefix cache reset, a new version number), so the policy pool follows the rounds
(a round's trained weights from the trainer's memory when it offered them, `offer`, else from
the round's exported files)
and, with `rounds.reference: previous`, the reference pool moves between the previous
round's policy (reference stage) and the initial model (evaluation). A request for weights
of another architecture than a pool's gets a pool of its own.

With `model.lora` the engines start on the base with LoRA serving on, and the rounds' policies
are adapters: a request for an adapter loads it into the role's slot of the pool (in place,
`workers.vllm_pool.Engine.load_adapter`) and runs with it, a request for the base runs
without one. With `model.lora.shared_engine` both roles use the policy pool: one engine
serves the reference (the base) and the policy (the round's adapter).

Engine actors are restarted by Ray when they die (`ENGINE_RESTARTS`), the call in flight is
retried, and the restarted engine reloads the weights the call names; each start and each
weight update is a `lifecycle` row in metrics.jsonl.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pipeline.config import ActorPoolConfig, PoolConfig, RunConfig
from pipeline.manifest import stable_hash
from workers.lora import base_of, is_adapter, vllm_max_rank
from workers.vllm_pool import (
    ENGINE_RESTARTS,
    EngineClient,
    call_wait_s,
    get_within,
    start_wait_s,
    weights_id,
)

ROLES = {"policy": "sampling", "reference": "reference"}  # role → its pool's config section
ADAPTER_SLOT = {"policy": 1, "reference": 2}  # role → the LoRA slot its adapters load into
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
    adapters: dict[int, str] = field(default_factory=dict)  # LoRA slot → weights_id loaded


class Engines:
    """The run's engine pools (see the module docstring). `engine_cls` replaces the engine
    class (tests inject faults with a subclass)."""

    def __init__(self, cfg: RunConfig, sink: Any = None, engine_cls: type | None = None):
        import workers.vllm_pool

        self.cfg, self.sink = cfg, sink
        self.engine_cls = engine_cls or workers.vllm_pool.Engine  # looked up now (bench swaps it)
        self.pools: dict[tuple[str, str], _Pool] = {}
        # the latest round's weights in Ray's object store: (weights_id, references)
        self.offered: tuple[str, list[Any]] | None = None
        self.lock = threading.Lock()  # stages ask from two driver threads (pipeline.dag)

    def client(self, role: str, weights_path: str) -> EngineClient:
        """A client of `role`'s pool serving the weights at `weights_path`, full weights or
        a LoRA adapter (the pool is started, or loads them in place, first: an adapter's
        base too, when the pool serves other full weights)."""
        with self.lock:  # one pool per role and architecture, one load at a time
            return self._client(role, weights_path)

    def _client(self, role: str, weights_path: str) -> EngineClient:
        base = base_of(weights_path)
        key = (pool_role(self.cfg, role), architecture(base))
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = self._start(pool_role(self.cfg, role), base)
        base_id = weights_id(base)
        if pool.weights != base_id:
            self._update(pool, base, base_id)
        wanted, slot = base_id, None
        if is_adapter(weights_path):
            wanted = weights_id(weights_path)
            slot = ADAPTER_SLOT[role]
            if pool.adapters.get(slot) != wanted:
                self._update(pool, weights_path, wanted, slot)
        return EngineClient(tuple(pool.actors), weights_path, wanted, pool.version, pool.name,
                            call_wait_s(pool.config.engine.call_timeout_s), slot,
                            (pool.weights_path, pool.weights) if slot is not None else None)

    def offer(self, weights_path: str, refs: list[Any], at: str | None = None) -> None:
        """The weights exported at `weights_path` (to be moved to `at`, if given) are also in
        Ray's object store (`refs`, workers.weight_sync.offer): a pool asked for them next
        loads them from there. Only the latest offer is kept (an older round's objects are
        freed)."""
        with self.lock:
            self.offered = (weights_id(weights_path, at), list(refs))

    def _start(self, role: str, weights_path: str) -> _Pool:
        import ray

        config = pool_config(self.cfg, role)
        name = role if not any(k[0] == role for k in self.pools) else f"{role}-{len(self.pools)}"
        remote = ray.remote(self.engine_cls).options(
            num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor,
            resources=dict(config.resources) or None, max_restarts=ENGINE_RESTARTS,
            max_task_retries=ENGINE_RESTARTS)
        # LoRA serving where the pool may be asked for adapters: the policy's, or the
        # reference's when the reference is the previous round's policy
        lora = self.cfg.model.lora if (role == "policy" or self.cfg.rounds.reference == "previous"
                                       ) else None
        actors = [remote.remote(weights_path, config.engine.model_dump(),
                                self.cfg.model.trust_remote_code, self.cfg.sampling.seed,
                                f"{name}-{i}", self.sink,
                                max_lora_rank=vllm_max_rank(lora.r) if lora else None)
                  for i in range(config.num_actors)]
        get_within([a.ready.remote() for a in actors], start_wait_s(config.engine.call_timeout_s),
                   f"starting the {name} engines ({weights_path})")
        return _Pool(name, config, actors, weights_path, weights_id(weights_path), 0)

    def _update(self, pool: _Pool, weights_path: str, wanted: str, slot: int | None = None
                ) -> None:
        """Load the weights at `weights_path` into every engine of `pool` (an adapter into
        LoRA slot `slot`), in place: a new version."""
        version = pool.version + 1
        if slot is not None:
            calls = [a.load_adapter.remote(slot, weights_path, version) for a in pool.actors]
        elif self.offered is not None and self.offered[0] == wanted:
            calls = [a.receive_weights.remote(self.offered[1], weights_path, wanted, version)
                     for a in pool.actors]
        else:
            calls = [a.update_weights.remote(weights_path, version) for a in pool.actors]
        get_within(calls, start_wait_s(pool.config.engine.call_timeout_s),
                   f"loading {weights_path} into the {pool.name} engines")
        pool.version = version
        if slot is None:
            pool.weights_path, pool.weights = weights_path, wanted
        else:
            pool.adapters[slot] = wanted

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


def pool_role(cfg: RunConfig, role: str) -> str:
    """The pool serving `role`: its own, or with a shared LoRA engine the policy's."""
    return "policy" if cfg.model.lora is not None and cfg.model.lora.shared_engine else role


def pool_config(cfg: RunConfig, role: str) -> PoolConfig:
    """The config of the pool serving `role` (what its engines compute with)."""
    return getattr(cfg, ROLES[pool_role(cfg, role)])


def map_args(pool: ActorPoolConfig) -> dict[str, Any]:
    """map_batches arguments of the UDF tasks feeding a pool's actors (engines, scorers): as
    many at once as actors, no resources of their own (the actors hold them; a UDF only
    waits on its actor)."""
    from ray.data import TaskPoolStrategy

    return {"compute": TaskPoolStrategy(size=pool.num_actors), "num_cpus": 0,
            "batch_size": pool.batch_size}


def fused_write_args(args: dict[str, Any]) -> dict[str, Any]:
    """write_parquet arguments that put a write into the tasks of the map before it, whose
    map_batches arguments are `args` (map_args, score.pool_map_args): the same resources and
    as many at once. Else Ray Data runs the write as tasks of their own (a CPU each), one
    more task per block."""
    remote = {k: args[k] for k in ("num_cpus", "num_gpus", "resources") if args.get(k) is not None}
    return {"ray_remote_args": remote, "concurrency": args["compute"].size}
