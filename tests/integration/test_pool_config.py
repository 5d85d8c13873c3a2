"""Each vLLM pool runs with its own engine settings: read from inside the run's real engine
actors (pipeline.engines), what each engine was built with and what its process sees."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_each_pool_gets_its_own_kv_cache_space(ray_cluster, make_config, tmp_path):
    import ray

    from pipeline.engines import Engines

    def built_with(engine) -> tuple[int, str | None]:  # here, so Ray ships it by value
        """The KV-cache bytes the engine's vLLM was built with, its VLLM_CPU_KVCACHE_SPACE."""
        import os

        return (engine.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes,
                os.environ.get("VLLM_CPU_KVCACHE_SPACE"))

    engine = {"dtype": "float32", "max_model_len": 256}
    cfg = make_config(tmp_path / "run",
                      reference={"batch_size": 64, "engine": {**engine, "kv_cache_space_gib": 2}},
                      sampling={"batch_size": 8, "n": 1, "max_tokens": 4,
                                "engine": {**engine, "kv_cache_space_gib": 1}},
                      rounds={"mode": "online", "count": 2})
    with Engines(cfg) as engines:
        seen = {}
        for role in ("reference", "policy"):
            client = engines.client(role, cfg.model.policy)
            seen[role] = ray.get([a.__ray_call__.remote(built_with) for a in client.actors])
    assert seen == {"reference": [(2 * 2**30, "2")], "policy": [(1 * 2**30, "1")]}
