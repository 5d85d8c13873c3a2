"""A vLLM engine actor killed mid-stage, or one whose call never answers: Ray restarts the
engine, the call in flight is retried on it, the restarted engine reloads the weights it
served, and every row comes out exactly once. The fault is injected by the engine itself:
a subclass of `workers.vllm_pool.Engine` (the run's engines are built from
`pipeline.engines.Engines(engine_cls=...)`) that SIGKILLs its own process on its second
call, or whose `generate` never returns on it, the first time only (a marker file
survives the restart)."""

from __future__ import annotations

import collections
import json
import os
import signal
import threading

import pyarrow.parquet as pq
import pytest

from tests.integration.hf_logps import REF_TOLERANCE, changed_copy, hf_response_logps

pytestmark = pytest.mark.integration


def dies_once(marker: str) -> type:
    """An Engine whose process is SIGKILLed on its second served call, once. Defined in a
    function so Ray ships the class by value."""
    from workers.vllm_pool import Engine

    class DiesOnce(Engine):
        served = 0

        def serve(self, *args, **kwargs):
            DiesOnce.served += 1
            if DiesOnce.served == 2 and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return super().serve(*args, **kwargs)

    return DiesOnce


def hangs_once(marker: str) -> type:
    """An Engine whose second `generate` never returns (vLLM's generate blocks forever),
    once: the engine's own watchdog must end the actor."""
    from workers.vllm_pool import Engine

    class HangsOnce(Engine):
        generated = 0

        def generate(self, prompts, params, lora=None):
            HangsOnce.generated += 1
            if HangsOnce.generated == 2 and not os.path.exists(marker):
                open(marker, "w").close()
                real = self.llm.generate

                def never_answers(*args, **kwargs):
                    threading.Event().wait()  # blocks forever, like a wedged engine
                    return real(*args, **kwargs)

                self.llm.generate = never_answers
            return super().generate(prompts, params, lora)

    return HangsOnce


def test_reference_survives_an_engine_call_that_never_answers(prepared_pairs, make_config,
                                                               tmp_path):
    from pipeline.engines import Engines
    from pipeline.stages.reference import compute_reference

    cfg = make_config(tmp_path / "run", reference={
        "batch_size": 16, "engine": {"dtype": "float32", "max_model_len": 256,
                                     "call_timeout_s": 20}})  # an engine start: 60 s
    marker = tmp_path / "hung"
    with Engines(cfg, engine_cls=hangs_once(str(marker))) as engines:
        client = engines.client("reference", cfg.model.reference_path)
        rows = compute_reference({"train": prepared_pairs}, client, cfg.reference, tmp_path / "out")
    assert marker.exists(), "the fault was not injected"
    given = pq.read_table(prepared_pairs).column("id").to_pylist()
    got = pq.read_table(tmp_path / "out" / "train").column("id").to_pylist()
    assert rows["train"] == len(got) == len(given) > 32
    assert collections.Counter(got) == collections.Counter(given)  # each row exactly once


def test_a_killed_engine_comes_back_on_the_weights_it_served(prepared_pairs, make_config,
                                                             toy_world, tmp_path):
    """The engine started on the initial weights, then loaded new ones (version 1), then
    was killed mid-stage: its restart (on the initial checkpoint) must reload version 1
    before answering, so every row's log-probs are those of the new weights."""
    import ray
    from transformers import AutoModelForCausalLM

    from pipeline.engines import Engines
    from pipeline.stages.reference import compute_reference
    from workers.metrics_sink import MetricsSink

    new_dir = str(tmp_path / "new")
    changed_copy(str(toy_world.model_dir), new_dir)
    cfg = make_config(tmp_path / "run", reference={"batch_size": 16})
    marker = tmp_path / "killed"
    sink = ray.remote(MetricsSink).options(num_cpus=0).remote(str(tmp_path / "metrics.jsonl"), {})
    with Engines(cfg, sink, engine_cls=dies_once(str(marker))) as engines:
        engines.client("reference", cfg.model.reference_path)  # started on the initial weights
        client = engines.client("reference", new_dir)  # version 1, in place
        rows = compute_reference({"train": prepared_pairs}, client, cfg.reference, tmp_path / "out")
        served = ray.get(engines.pools[next(iter(engines.pools))].actors[0].ready.remote())
    ray.get(sink.set_context.remote())  # flushed
    assert marker.exists(), "the fault was not injected"
    given = pq.read_table(prepared_pairs).column("id").to_pylist()
    out = pq.read_table(tmp_path / "out" / "train").to_pylist()
    assert rows["train"] == len(out) == len(given) > 32  # more than two batches
    assert collections.Counter(r["id"] for r in out) == collections.Counter(given)  # once each
    assert served == 1
    model = AutoModelForCausalLM.from_pretrained(new_dir, dtype="float32").eval()
    for r in out[::7]:
        assert abs(r["ref_chosen_logp"] - hf_response_logps(model, r["prompt_ids"], r["chosen_ids"])
                   ) < REF_TOLERANCE, r["id"]
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "engine_start"]
    updates = [e for e in events if e["event"] == "weight_update"]
    assert [e["restarted"] for e in starts] == [False, True]
    assert [e["version"] for e in updates] == [1, 1]  # in place, then again after the restart
    assert all(e["kind"] == "lifecycle" and e["bytes"] > 0 for e in updates)


def test_sampling_survives_a_killed_engine_actor(prepared_pairs, make_config, tmp_path):
    from pipeline.engines import Engines
    from pipeline.stages.sample import prompt_pool, run_sample

    cfg = make_config(tmp_path / "run", sampling={"batch_size": 8, "n": 2, "max_tokens": 8},
                      rounds={"mode": "online", "count": 2})
    prompts = prompt_pool(cfg, prepared_pairs)[:24]
    marker = tmp_path / "killed"
    with Engines(cfg, engine_cls=dies_once(str(marker))) as engines:
        n = run_sample(prompts, engines.client("policy", cfg.model.policy), cfg, 0, tmp_path)
    assert marker.exists(), "the fault was not injected"
    samples = pq.read_table(tmp_path / "samples").to_pylist()
    assert n == len(samples) == 2 * len(prompts)
    per_prompt = collections.Counter((s["prompt_id"], s["sample_index"]) for s in samples)
    assert set(per_prompt) == {(p["prompt_id"], j) for p in prompts for j in (0, 1)}
    assert set(per_prompt.values()) == {1}  # each (prompt, sample) exactly once
