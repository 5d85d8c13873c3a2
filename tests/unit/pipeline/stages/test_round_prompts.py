"""Which prompts a sampled round answers (pipeline.stages.sample.round_prompts):
`rounds.mode: iterative` the whole pool every round, `online` a fresh slice per round."""

from __future__ import annotations

import pytest

from pipeline.config import parse_config
from pipeline.stages.sample import round_prompts

POOL = [{"prompt_id": f"p{i}", "prompt_text": f"prompt {i}", "prompt_ids": [i]} for i in range(10)]


def rounds_config(**rounds):
    return parse_config({"model": {"policy": "m"}, "data": {"train": ["d.parquet"]},
                         "rounds": {"count": 3, **rounds},
                         "reward": {"kind": "function", "function": "pipeline.toy.reward:toy_gold_rewards"}})


def ids(prompts):
    return [p["prompt_id"] for p in prompts]


def test_iterative_samples_the_whole_pool_every_round():
    cfg = rounds_config(mode="iterative")
    per_round = [ids(round_prompts(POOL, cfg, k)) for k in range(3)]
    assert sorted(per_round[0]) == ids(POOL)  # every prompt, once
    assert per_round[1] == per_round[2] == per_round[0]


def test_iterative_with_prompts_per_round_keeps_the_same_prompts():
    cfg = rounds_config(mode="iterative", prompts_per_round=4)
    per_round = [ids(round_prompts(POOL, cfg, k)) for k in range(3)]
    assert len(set(per_round[0])) == 4 and per_round[1] == per_round[2] == per_round[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_online_takes_a_fresh_slice_each_round_and_wraps_around(seed):
    cfg = rounds_config(mode="online", prompts_per_round=4, seed=seed)
    per_round = [ids(round_prompts(POOL, cfg, k)) for k in range(3)]
    assert all(len(set(r)) == 4 for r in per_round)
    assert not set(per_round[0]) & set(per_round[1])  # rounds 0 and 1: 8 distinct prompts
    # round 2 takes the last 2 prompts no round has seen, then wraps to the start
    unseen = set(ids(POOL)) - set(per_round[0]) - set(per_round[1])
    assert set(per_round[2][:2]) == unseen and per_round[2][2:] == per_round[0][:2]
