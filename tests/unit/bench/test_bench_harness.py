"""bench/harness.py and bench/fixtures.py: the pure helpers the benchmarks share (formatting, rates, the bench
model's size, pair token counts, the timing subclass). No timings are asserted."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from bench.fixtures import BENCH_MODEL, bench_model_config, pair_tokens, qwen2_param_count
from bench.harness import fmt, line, ratio_line, read_timings, steady_rate, timed_subclass


def test_fmt_and_line():
    assert fmt(1234.0) == "1234"
    assert fmt(123.45) == "123.5"
    assert fmt(1.2345) == "1.23"
    assert fmt(0.012345) == "0.0123"
    assert fmt(float("nan")) == "nan"
    assert line("pairs/s", 12.345) == "pairs/s: 12.35"
    assert line("peak RSS", 800.0, "MiB") == "peak RSS: 800.0 MiB"
    assert line("machine", "2 cores") == "machine: 2 cores"


def test_ratio_line_states_the_target():
    assert ratio_line("ours / TRL", 3.0, 2.0) == "ours / TRL: 1.50x"
    assert ratio_line("ours / TRL", 3.0, 2.0, target=1.5).endswith("(target >= 1.5x: met)")
    assert ratio_line("ours / TRL", 2.0, 2.0, target=1.5).endswith("(target >= 1.5x: missed)")
    assert "nan" in ratio_line("x", 1.0, 0.0)


def test_steady_rate_skips_warmup():
    # step ends at 10 (slow warm-up), then one step per 0.5 s
    assert steady_rate([10.0, 10.5, 11.0, 11.5], per_step=16) == pytest.approx(32.0)
    assert math.isnan(steady_rate([1.0], per_step=16))


@pytest.mark.parametrize("overrides", [{}, {"num_hidden_layers": 2, "hidden_size": 128,
                                            "num_attention_heads": 2, "intermediate_size": 256}])
def test_param_count_matches_the_model(overrides):
    from transformers import Qwen2ForCausalLM

    cfg = bench_model_config(850, **overrides)
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM CPU needs head_dim >= 32
    n = sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())
    assert qwen2_param_count(cfg) == n


def test_bench_model_is_about_twelve_million():
    assert 10e6 < qwen2_param_count(bench_model_config(850)) < 30e6
    assert BENCH_MODEL["hidden_size"] % BENCH_MODEL["num_attention_heads"] == 0


def test_pair_tokens_counts_the_prompt_twice():
    pairs = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]}]
    assert pair_tokens(pairs) == 2 * 3 + 2 + 1


def test_timed_subclass_records_and_keeps_behaviour(tmp_path):
    class Udf:
        def __init__(self, k):
            self.k = k

        def __call__(self, x):
            return x * self.k

    log = tmp_path / "t.jsonl"
    timed = timed_subclass(Udf, log, ["__call__"])
    assert timed.__name__ == "Udf" and issubclass(timed, Udf)
    u = timed(3)
    assert u(2) == 6 and u(5) == 15
    rows = read_timings(log)
    assert [r["what"] for r in rows] == ["init", "__call__", "__call__"]
    assert all(r["cls"] == "Udf" and r["s"] >= 0 for r in rows)
    assert read_timings(tmp_path / "missing.jsonl") == []


def test_processes_matching_keeps_only_descendants():
    import os
    import subprocess

    from bench.harness import descends_from, processes_matching

    child = subprocess.Popen(["sleep", "30"])
    try:
        # Popen returns when the child's close-on-exec pipe closes, which is before the kernel
        # has set up the new program's arguments: wait for its cmdline (CI read it empty)
        cmdline = Path(f"/proc/{child.pid}/cmdline")
        deadline = time.monotonic() + 20
        while b"sleep" not in cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert child.pid in processes_matching("sleep", ancestor=os.getpid())
        assert descends_from(child.pid, os.getpid())
        assert not descends_from(os.getpid(), child.pid)
    finally:
        child.kill()
        child.wait()
