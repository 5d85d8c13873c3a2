"""The driver's datasets are cut into a block per batch of their consumer (pipeline.blocks):
a small stage output is not split into Ray's two blocks per CPU, and a table fed to a pool
of two engines reaches both at once."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration


def test_a_small_read_is_a_block_per_batch_in_its_order(ray_cluster, tmp_path):
    from pipeline.blocks import read_parquet

    out = tmp_path / "samples"
    out.mkdir()
    pq.write_table(pa.table({"i": list(range(130))}), out / "part-0.parquet")
    ds = read_parquet(out, 64).materialize()
    assert ds.num_blocks() == 3  # Ray's own choice on this 6-CPU cluster: 12
    assert [r["i"] for r in ds.take_all()] == list(range(130))
    assert read_parquet(out, 1000).materialize().num_blocks() == 1


def test_a_table_reaches_every_engine_task_of_its_pool_at_once(ray_cluster, make_config, tmp_path):
    """Four batches through a map shaped like an engine pool's (pipeline.engines.map_args) of
    two: two tasks run side by side. A table in one block would be one task, one batch after
    another."""
    from pipeline.blocks import from_table
    from pipeline.engines import map_args

    def slow(batch: pa.Table) -> pa.Table:
        start = time.time()
        time.sleep(1.0)
        return batch.append_column("start", pa.array([start] * len(batch))).append_column(
            "end", pa.array([time.time()] * len(batch)))

    pool = make_config(tmp_path / "run", sampling={"num_actors": 2, "batch_size": 8}).sampling
    ds = from_table(pa.table({"i": list(range(32))}), pool.batch_size)
    assert ds.num_blocks() == 4
    rows = ds.map_batches(slow, batch_format="pyarrow", **map_args(pool)).take_all()
    assert sorted(r["i"] for r in rows) == list(range(32))
    spans = sorted({(r["start"], r["end"]) for r in rows})
    assert len(spans) == 4  # a call per batch
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # two calls overlapped
