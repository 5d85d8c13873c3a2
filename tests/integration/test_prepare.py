"""The prepare stage on Ray Data: many files, chat and string rows, exact quarantine."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, DataConfig

pytestmark = pytest.mark.integration


def test_prepare_counts_and_provenance(ray_cluster, toy_world, tmp_path):
    from pipeline.stages.prepare import run_prepare

    good = pq.read_table(toy_world.train_path).slice(0, 10).to_pylist()
    rows = good[:6] + [
        {**good[6], "chosen": None},                      # row 6: missing_field
        {**good[7], "rejected": good[7]["chosen"]},       # row 7: chosen_equals_rejected
        {**good[8], "chosen_score": float("inf")},        # row 8: non_finite_score
        {**good[9], "rejected": "   "},                   # row 9: empty_response
    ]
    a = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), a, row_group_size=3)  # 4 row groups
    b = tmp_path / "b.parquet"
    pq.write_table(pq.read_table(toy_world.train_chat_path).slice(0, 5), b)
    cfg = DataConfig(train=[str(a), str(b)], chat_template="always", max_quarantine_fraction=0.5)
    out = tmp_path / "out"
    stats = run_prepare([str(a), str(b)], str(toy_world.model_dir), cfg, out, False)
    assert stats["rows_in"] == 15 and stats["pairs"] == 11 and stats["quarantined"] == 4
    assert stats["quarantine_reasons"] == {"missing_field": 1, "chosen_equals_rejected": 1,
                                           "non_finite_score": 1, "empty_response": 1}
    q = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert [(r["source_file"], r["source_row"]) for r in q] == [(str(a), i) for i in (6, 7, 8, 9)]
    assert all(r["row_json"] and r["detail"] for r in q)
    pairs = pq.read_table(out / "pairs.parquet")
    # the same pair as a string row and as a chat row tokenises identically
    by_file = {}
    for r in pairs.to_pylist():
        by_file.setdefault(r["source_file"], []).append(r)
    for s, c in zip(by_file[str(a)][:5], by_file[str(b)][:5]):
        assert (s["prompt_ids"], s["chosen_ids"], s["rejected_ids"]) == \
               (c["prompt_ids"], c["chosen_ids"], c["rejected_ids"])

    cfg = DataConfig(train=[str(a)], chat_template="always", max_quarantine_fraction=0.1)
    with pytest.raises(ConfigError, match="4 of 10 rows"):
        run_prepare([str(a)], str(toy_world.model_dir), cfg, tmp_path / "out2", False)


def test_corrupt_parquet_is_named(ray_cluster, toy_world, tmp_path):
    from pipeline.stages.prepare import run_prepare

    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ConfigError, match="broken.parquet: cannot read as parquet"):
        run_prepare([str(bad)], str(toy_world.model_dir), DataConfig(train=[str(bad)]),
                    tmp_path / "o", False)
