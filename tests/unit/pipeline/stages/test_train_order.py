"""Training order: a seeded shuffle that is the same on every run, or a Curry-DPO curriculum."""

from __future__ import annotations

import pyarrow as pa

from pipeline.stages.train import order_key

BATCH = pa.table({"id": [f"p{i}" for i in range(50)], "chosen_score": [i / 50 for i in range(50)],
                  "rejected_score": [0.0] * 50})


def order(seed, shuffle=True):
    keys = order_key(BATCH, seed, shuffle).to_pylist()
    return [i for _, i in sorted(zip(keys, BATCH["id"].to_pylist()))]


def test_seeded_shuffle_is_reproducible_and_seed_dependent():
    assert order(3) == order(3)
    assert order(3) != order(4)
    assert sorted(order(3)) == sorted(BATCH["id"].to_pylist())
    assert order(3) != BATCH["id"].to_pylist()
    # the key of a pair depends only on its id, so a row's place does not depend on its block
    assert order_key(BATCH.slice(10, 5), 3, True).to_pylist() == order_key(BATCH, 3, True).to_pylist()[10:15]


def test_curriculum_puts_the_largest_gap_first():
    assert order(0, shuffle=False) == [f"p{i}" for i in reversed(range(50))]
