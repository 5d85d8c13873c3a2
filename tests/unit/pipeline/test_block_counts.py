"""How many blocks the driver's datasets get (pipeline.blocks), without Ray."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.blocks import MAX_BLOCKS, num_blocks, parquet_files, parquet_rows


def test_a_block_per_batch_within_bounds():
    assert num_blocks(0, 64) == 1
    assert num_blocks(64, 64) == 1
    assert num_blocks(65, 64) == 2
    assert num_blocks(130, 64) == 3
    assert num_blocks(10**7, 1) == MAX_BLOCKS
    assert num_blocks(5, 0) == 5  # a batch size of 0 counts as 1


def test_rows_come_from_the_footers_of_a_file_or_a_directory(tmp_path):
    out = tmp_path / "stage"
    out.mkdir()
    pq.write_table(pa.table({"x": list(range(70))}), out / "a.parquet")
    pq.write_table(pa.table({"x": list(range(60))}), out / "b.parquet")
    (out / "_SUCCESS").write_text("")  # not parquet: not read
    assert [f.name for f in parquet_files(out)] == ["a.parquet", "b.parquet"]
    assert parquet_rows(out) == 130
    assert parquet_rows(out / "a.parquet") == 70
    assert parquet_files(tmp_path / "never-written") == []
    assert parquet_rows(tmp_path / "never-written") == 0
