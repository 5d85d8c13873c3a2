"""A vLLM actor killed mid-stage, or one whose engine call never answers: Ray Data restarts
it, retries the lost batch, and every row comes out exactly once. The fault is injected by
the actor itself: a subclass of the stage's engine UDF that SIGKILLs its own process on its
second batch, or whose engine's `generate` never returns on it, once per test."""

from __future__ import annotations

import collections
import os
import signal
import threading

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration


def dies_once(base: type, marker: str) -> type:
    """`base` (an engine UDF) whose actor process is SIGKILLed on its second batch, the
    first time only (the marker file survives the restart). Defined in a function so Ray
    ships the class by value."""

    class DiesOnce(base):
        calls = 0

        def __call__(self, batch):
            DiesOnce.calls += 1
            if DiesOnce.calls == 2 and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    return DiesOnce


def hangs_once(base: type, marker: str) -> type:
    """`base` whose engine call on the second batch never returns (the vLLM `generate`
    blocks forever), the first time only: the engine's own watchdog must end the actor."""

    class HangsOnce(base):
        calls = 0

        def __call__(self, batch):
            HangsOnce.calls += 1
            if HangsOnce.calls == 2 and not os.path.exists(marker):
                open(marker, "w").close()
                real = self.engine.llm.generate

                def never_answers(*args, **kwargs):
                    threading.Event().wait()  # blocks forever, like a wedged engine
                    return real(*args, **kwargs)

                self.engine.llm.generate = never_answers
            return super().__call__(batch)

    return HangsOnce


def test_reference_survives_an_engine_call_that_never_answers(prepared_pairs, make_config,
                                                               tmp_path):
    from pipeline.stages.reference import compute_reference
    from workers.vllm_pool import PairLogprobs

    cfg = make_config(tmp_path / "run", reference={
        "batch_size": 16, "engine": {"dtype": "float32", "max_model_len": 256,
                                     "call_timeout_s": 40}})
    marker = tmp_path / "hung"
    rows = compute_reference({"train": prepared_pairs}, cfg.model.reference_path, cfg.reference,
                             False, tmp_path / "out", udf=hangs_once(PairLogprobs, str(marker)))
    assert marker.exists(), "the fault was not injected"
    given = pq.read_table(prepared_pairs).column("id").to_pylist()
    got = pq.read_table(tmp_path / "out" / "train").column("id").to_pylist()
    assert rows["train"] == len(got) == len(given) > 32
    assert collections.Counter(got) == collections.Counter(given)  # each row exactly once


def test_reference_survives_a_killed_engine_actor(prepared_pairs, make_config, tmp_path):
    from pipeline.stages.reference import compute_reference
    from workers.vllm_pool import PairLogprobs

    cfg = make_config(tmp_path / "run", reference={"batch_size": 16})
    marker = tmp_path / "killed"
    rows = compute_reference({"train": prepared_pairs}, cfg.model.reference_path, cfg.reference,
                             False, tmp_path / "out", udf=dies_once(PairLogprobs, str(marker)))
    assert marker.exists(), "the fault was not injected"
    given = pq.read_table(prepared_pairs).column("id").to_pylist()
    out = pq.read_table(tmp_path / "out" / "train")
    got = out.column("id").to_pylist()
    assert rows["train"] == len(got) == len(given) > 32  # more than two batches
    assert collections.Counter(got) == collections.Counter(given)  # each row exactly once
    assert all(v < 0 for v in out.column("ref_chosen_logp").to_pylist())


def test_sampling_survives_a_killed_engine_actor(prepared_pairs, make_config, tmp_path):
    from pipeline.stages.sample import prompt_pool, run_sample
    from workers.vllm_pool import Sampler

    cfg = make_config(tmp_path / "run", sampling={"batch_size": 8, "n": 2, "max_tokens": 8},
                      rounds={"mode": "online", "count": 2})
    prompts = prompt_pool(cfg, prepared_pairs)[:24]
    marker = tmp_path / "killed"
    n = run_sample(prompts, cfg.model.policy, cfg, 0, tmp_path,
                   udf=dies_once(Sampler, str(marker)))
    assert marker.exists(), "the fault was not injected"
    samples = pq.read_table(tmp_path / "samples").to_pylist()
    assert n == len(samples) == 2 * len(prompts)
    per_prompt = collections.Counter((s["prompt_id"], s["sample_index"]) for s in samples)
    assert set(per_prompt) == {(p["prompt_id"], j) for p in prompts for j in (0, 1)}
    assert set(per_prompt.values()) == {1}  # each (prompt, sample) exactly once
