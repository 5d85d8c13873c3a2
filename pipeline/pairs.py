"""Preference pairs from scored on-policy samples (pure functions, no Ray).

Per prompt: optional RSO rejection sampling (arXiv 2309.06657), then a pair rule
(best-vs-worst, or every pair above a margin), ties and near-ties dropped, an optional
length guard; optionally Curry-DPO ordering (arXiv 2403.07230: largest reward gap first).
Each response also gets its win rate against the prompt's other samples, the P̂ that
SPPO (arXiv 2405.00675) regresses towards.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.config import RoundsConfig
from pipeline.evalstats import win_rates


def rso_accept(scores: Sequence[float], beta: float, rng: random.Random) -> list[bool]:
    """Accept sample i with probability exp((r_i − max r)/β); the best is always kept."""
    top = max(scores)
    return [rng.random() < math.exp((s - top) / beta) for s in scores]


def candidate_pairs(scores: Sequence[float], rule: str) -> list[tuple[int, int]]:
    """(higher, lower) index pairs the rule considers: one per prompt, or every unordered pair."""
    n = len(scores)
    if n < 2:
        return []
    if rule == "best_vs_worst":
        best = max(range(n), key=lambda i: (scores[i], -i))
        worst = min(range(n), key=lambda i: (scores[i], i))
        return [(best, worst)]
    return [(i, j) if scores[i] >= scores[j] else (j, i) for i in range(n) for j in range(i + 1, n)]


def build_pairs(samples: Iterable[dict[str, Any]], cfg: RoundsConfig, seed: int
                ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pairs (prepared-pair schema plus win rates) and counts of what was dropped and why."""
    groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for s in samples:
        groups[str(s["prompt_id"])].append(s)
    rng = random.Random(seed)
    counts = collections.Counter()
    pairs = []
    for prompt_id in sorted(groups):
        group = sorted(groups[prompt_id], key=lambda s: s["sample_index"])
        counts["prompts"] += 1
        counts["samples"] += len(group)
        if cfg.rejection_sampling:
            keep = rso_accept([s["score"] for s in group], cfg.rso_beta, rng)
            counts["rso_rejected"] += keep.count(False)
            group = [s for s, k in zip(group, keep) if k]
        scores = [float(s["score"]) for s in group]
        rates = win_rates(scores)
        candidates = candidate_pairs(scores, cfg.pair_rule)
        kept = [(i, j) for i, j in candidates if scores[i] - scores[j] > cfg.min_margin]
        counts["ties_or_near_ties"] += len(candidates) - len(kept)
        for i, j in kept:
            c, r = group[i], group[j]
            if cfg.max_length_ratio and len(c["response_ids"]) > cfg.max_length_ratio * len(r["response_ids"]):
                counts["length_guard"] += 1
                continue
            pairs.append({
                "id": f"{prompt_id}:{c['sample_index']}>{r['sample_index']}",
                "prompt_text": c["prompt_text"], "prompt_messages": c.get("prompt_messages"),
                "prompt_ids": list(c["prompt_ids"]),
                "chosen_ids": list(c["response_ids"]), "rejected_ids": list(r["response_ids"]),
                "chosen_score": scores[i], "rejected_score": scores[j],
                "chosen_winrate": rates[i], "rejected_winrate": rates[j],
                "truncated": "none", "source_file": "", "source_row": -1,
            })
    if cfg.curriculum:
        pairs.sort(key=lambda p: p["chosen_score"] - p["rejected_score"], reverse=True)
    counts["pairs"] = len(pairs)
    return pairs, dict(counts)
