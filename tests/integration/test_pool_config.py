"""Each vLLM pool runs with its own engine settings: read from inside the real engine actors
(a subclass of the stage's UDF adds what its engine was built with to every output row)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration


def reports_kv_cache(base: type) -> type:
    """`base` (an engine UDF) that adds the KV-cache bytes its vLLM engine was built with and
    the VLLM_CPU_KVCACHE_SPACE its process sees. Defined in a function so Ray ships it by value."""

    class ReportsKvCache(base):
        def __call__(self, batch):
            import os

            out = super().__call__(batch)
            kv = self.engine.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes
            out = out.append_column("kv_bytes", pa.array([kv] * len(out), pa.int64()))
            env = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
            return out.append_column("kv_env", pa.array([env] * len(out), pa.string()))

    return ReportsKvCache


def test_each_pool_gets_its_own_kv_cache_space(prepared_pairs, make_config, tmp_path):
    from pipeline.stages.reference import compute_reference
    from pipeline.stages.sample import prompt_pool, run_sample
    from workers.vllm_pool import PairLogprobs, Sampler

    engine = {"dtype": "float32", "max_model_len": 256}
    cfg = make_config(tmp_path / "run",
                      reference={"batch_size": 64, "engine": {**engine, "kv_cache_space_gib": 2}},
                      sampling={"batch_size": 8, "n": 1, "max_tokens": 4,
                                "engine": {**engine, "kv_cache_space_gib": 1}},
                      rounds={"mode": "online", "count": 2})
    compute_reference({"train": prepared_pairs}, cfg.model.reference_path, cfg.reference, False,
                      tmp_path / "ref", udf=reports_kv_cache(PairLogprobs))
    run_sample(prompt_pool(cfg, prepared_pairs)[:8], cfg.model.policy, cfg, 0, tmp_path / "s",
               udf=reports_kv_cache(Sampler))
    ref = pq.read_table(tmp_path / "ref" / "train", columns=["kv_bytes", "kv_env"]).to_pylist()
    smp = pq.read_table(tmp_path / "s" / "samples", columns=["kv_bytes", "kv_env"]).to_pylist()
    assert ref and smp
    assert {(r["kv_bytes"], r["kv_env"]) for r in ref} == {(2 * 2**30, "2")}
    assert {(r["kv_bytes"], r["kv_env"]) for r in smp} == {(1 * 2**30, "1")}
