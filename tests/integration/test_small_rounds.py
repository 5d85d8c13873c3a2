"""An online round never dies of a small yield: pairs that do not fill a global batch wait
for the next round (train stage → carry → the next round's pair stage), through the real
Ray Data train-stage input. No training is needed to see it: a round whose pairs are fewer
than one global batch trains nothing and returns the policy it started from."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration


def scored_samples(prompt_ids, n=2, score=0.5):
    """Scored samples that are all ties: the round yields no new pair."""
    return [{"prompt_id": f"p{k}", "sample_index": j, "prompt_text": "List two fruits.",
             "prompt_ids": [1, 2, 3], "response_ids": [4 + j, 5], "response": "x",
             "policy_logp": -1.0, "score": score} for k in prompt_ids for j in range(n)]


def test_a_round_with_too_few_pairs_carries_them_to_the_next(prepared_pairs, make_config,
                                                              tmp_path):
    from pipeline.stages.pair import run_pair
    from pipeline.stages.train import TrainerSession, run_train

    cfg = make_config(tmp_path / "run", rounds={"count": 3, "mode": "online"},
                      train={"num_workers": 2, "micro_batch_size": 2, "global_batch_size": 16})
    few = pq.read_table(prepared_pairs).slice(0, 6)
    n = few.num_rows
    for col in ("ref_chosen_logp", "ref_rejected_logp"):
        few = few.append_column(col, pa.array([-40.0] * n, pa.float64()))
    data = tmp_path / "round-1-pairs"
    data.mkdir()
    pq.write_table(few, data / "part-0.parquet")
    out = tmp_path / "train-out"
    out.mkdir()
    trainer = TrainerSession(cfg, tmp_path / "storage", {})
    result = run_train(data, cfg.model.policy, cfg, out, trainer, round_index=1, carry=True)
    assert trainer.thread is None, "a round that trains nothing started the trainer"
    assert result["optimizer_steps"] == result["trained_pairs"] == 0
    assert result["carried"] == 6 and result["model_dir"] == str(toy_policy(cfg))
    carried = pq.read_table(out / "carry")
    assert sorted(carried.column("id").to_pylist()) == sorted(
        f"r1/{i}" for i in few.column("id").to_pylist())
    assert "ref_chosen_logp" not in carried.column_names  # the next round's reference recomputes

    # the next round: all its samples tie, so its pairs are the carried ones
    scored = tmp_path / "scored"
    scored.mkdir()
    pq.write_table(pa.Table.from_pylist(scored_samples(range(4))), scored / "part-0.parquet")
    counts = run_pair(scored, cfg, seed=2, out_dir=tmp_path / "pair-out", carried=out / "carry")
    assert counts["pairs"] == 0 and counts["carried_in"] == 6
    pairs = pq.read_table(tmp_path / "pair-out" / "pairs.parquet")
    assert sorted(pairs.column("id").to_pylist()) == sorted(carried.column("id").to_pylist())
    assert pairs.column("chosen_ids").to_pylist() == carried.column("chosen_ids").to_pylist()


def toy_policy(cfg):
    from pathlib import Path

    return Path(cfg.model.policy).resolve()


def test_reference_over_splits_with_different_columns(prepared_pairs, make_config, tmp_path):
    """A sampled round's train pairs carry win rates its prepared eval pairs lack; one pool
    serves both splits, and each split comes out with its own columns (plus the reference
    ones). Ray Data took the union's schema from whichever block came first, so this failed
    on real data ('Field "chosen_winrate" does not exist') depending on timing."""
    from pipeline.engines import Engines
    from pipeline.stages.reference import compute_reference

    table = pq.read_table(prepared_pairs).slice(0, 8)
    sampled = table.append_column("chosen_winrate", pa.array([0.75] * 8, pa.float64())) \
        .append_column("rejected_winrate", pa.array([0.25] * 8, pa.float64()))
    train = tmp_path / "sampled.parquet"
    pq.write_table(sampled, train)
    cfg = make_config(tmp_path / "run", reference={"batch_size": 4})
    with Engines(cfg) as engines:
        rows = compute_reference({"eval": prepared_pairs, "train": train},
                                 engines.client("reference", cfg.model.reference_path),
                                 cfg.reference, tmp_path / "out")
    assert rows == {"eval": pq.read_table(prepared_pairs).num_rows, "train": 8}
    got_train = pq.read_table(tmp_path / "out" / "train")
    got_eval = pq.read_table(tmp_path / "out" / "eval")
    assert got_train.column("chosen_winrate").to_pylist() == [0.75] * 8
    assert "chosen_winrate" not in got_eval.column_names and "split" not in got_eval.column_names
    assert all(v < 0 for v in got_eval.column("ref_chosen_logp").to_pylist())
