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
    two: two calls are in flight at once. The first call waits for a second to arrive (a
    file each, in a folder every task sees); in one block, or with one task at a time, no
    second call could arrive while the first waits, and it gives up. A rendezvous, not
    timings: a slow worker start on a busy machine cannot fail it."""
    from pipeline.blocks import from_table
    from pipeline.engines import map_args

    arrivals = tmp_path / "arrivals"
    arrivals.mkdir()

    def meet(batch: pa.Table) -> pa.Table:
        (arrivals / f"call-{batch['i'][0].as_py()}").touch()
        deadline = time.monotonic() + 120
        while len(list(arrivals.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        met = len(list(arrivals.iterdir())) >= 2
        return batch.append_column("met", pa.array([met] * len(batch)))

    pool = make_config(tmp_path / "run", sampling={"num_actors": 2, "batch_size": 8}).sampling
    ds = from_table(pa.table({"i": list(range(32))}), pool.batch_size)
    assert ds.num_blocks() == 4
    rows = ds.map_batches(meet, batch_format="pyarrow", **map_args(pool)).take_all()
    assert sorted(r["i"] for r in rows) == list(range(32))
    assert sorted(p.name for p in arrivals.iterdir()) == ["call-0", "call-16", "call-24", "call-8"]
    assert all(r["met"] for r in rows)  # the first call met a second one in flight
