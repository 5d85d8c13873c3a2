"""Pair rules on hand-made scored samples."""

from __future__ import annotations

import random

import pytest

from pipeline.config import RoundsConfig
from pipeline.pairs import build_pairs, rso_accept, win_rates


def samples(prompt_id, scores, lengths=None):
    lengths = lengths or [3] * len(scores)
    return [{"prompt_id": prompt_id, "prompt_text": f"p{prompt_id}", "prompt_ids": [1, 2],
             "sample_index": i, "response_ids": list(range(10, 10 + n)), "score": s}
            for i, (s, n) in enumerate(zip(scores, lengths))]


def test_win_rates_by_hand():
    assert win_rates([3.0, 1.0, 2.0, 2.0]) == [1.0, 0.0, 0.5, 0.5]
    assert win_rates([1.0]) == [0.5]


def test_best_vs_worst_drops_ties():
    rows = samples("a", [0.2, 0.9, 0.5]) + samples("b", [0.4, 0.4, 0.4])
    pairs, counts = build_pairs(rows, RoundsConfig(), seed=0)
    assert len(pairs) == 1 and pairs[0]["id"] == "a:1>0"
    assert (pairs[0]["chosen_score"], pairs[0]["rejected_score"]) == (0.9, 0.2)
    assert (pairs[0]["chosen_winrate"], pairs[0]["rejected_winrate"]) == (1.0, 0.0)
    assert counts == {"prompts": 2, "samples": 6, "ties_or_near_ties": 1, "pairs": 1}


def test_all_above_margin_and_near_ties():
    cfg = RoundsConfig(pair_rule="all_above_margin", min_margin=0.15)
    pairs, counts = build_pairs(samples("a", [0.2, 0.9, 0.3, 0.8]), cfg, seed=0)
    got = {(p["chosen_score"], p["rejected_score"]) for p in pairs}
    assert got == {(0.9, 0.2), (0.9, 0.3), (0.8, 0.2), (0.8, 0.3)}
    assert counts["ties_or_near_ties"] == 2  # 0.3 vs 0.2 and 0.9 vs 0.8


def test_length_guard():
    cfg = RoundsConfig(max_length_ratio=1.5)
    pairs, counts = build_pairs(samples("a", [1.0, 0.0], lengths=[8, 4]), cfg, seed=0)
    assert pairs == [] and counts["length_guard"] == 1
    pairs, _ = build_pairs(samples("a", [1.0, 0.0], lengths=[5, 4]), cfg, seed=0)
    assert len(pairs) == 1


def test_curriculum_orders_easy_to_hard():
    rows = samples("a", [0.5, 0.4]) + samples("b", [1.0, 0.0]) + samples("c", [0.9, 0.6])
    pairs, _ = build_pairs(rows, RoundsConfig(curriculum=True), seed=0)
    gaps = [round(p["chosen_score"] - p["rejected_score"], 6) for p in pairs]
    assert gaps == [1.0, 0.3, 0.1]


def test_rso_acceptance_probability():
    rng = random.Random(0)
    accepted = [rso_accept([1.0, 1.0 - 0.5 * 0.6931], beta=0.5, rng=rng) for _ in range(4000)]
    assert all(a[0] for a in accepted)  # the best sample always passes
    assert sum(a[1] for a in accepted) / 4000 == pytest.approx(0.5, abs=0.03)
    pairs, counts = build_pairs(samples("a", [1.0, 0.0, 0.0, 0.0]),
                                RoundsConfig(rejection_sampling=True, rso_beta=0.01), seed=0)
    assert counts["rso_rejected"] == 3 and pairs == []
