"""The blocks of the datasets the driver builds: as many as the batches that consume them.

Ray Data cuts a read into at least two blocks per cluster CPU however small the data (its
parallelism floor): 128 samples on a 6-CPU cluster become 12 blocks of ~10 rows, and every
operator after the read that is not bundled to a batch size (a column map, a write) then
runs one task per block. On a small node that is most of a small online round: a parquet
read, map and write of 128 rows took 0.33 s in 12 blocks against 0.10 s in one
(bench/RESULTS.md, "Blocks the size of a batch").

The other way round, a dataset made from one in-memory table is one block, and a map over
it is one task calling the engines one batch after another: a pool of two engines served
one at a time. So a dataset gets one block per batch of its consumer, and never more than
MAX_BLOCKS (Ray's own default floor of read blocks; large data keeps large blocks, which Ray
still splits at its target block size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MAX_BLOCKS = 200  # ray.data.context.DEFAULT_READ_OP_MIN_NUM_BLOCKS


def num_blocks(rows: int, rows_per_block: int) -> int:
    """Blocks for `rows` rows consumed `rows_per_block` at a time: one per batch, 1..MAX_BLOCKS."""
    return max(1, min(-(-rows // max(1, rows_per_block)), MAX_BLOCKS))


def parquet_files(path: Path | str) -> list[Path]:
    """The parquet files of a stage output: the file itself, or a directory's *.parquet (none
    where nothing was written)."""
    path = Path(path)
    return sorted(path.glob("*.parquet")) if path.is_dir() else [path] if path.exists() else []


def parquet_rows(path: Path | str) -> int:
    """Rows of a parquet file or directory, from the files' footers (no data is read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(path))


def read_parquet(path: Path | str, rows_per_block: int) -> Any:
    """ray.data.read_parquet of a stage output in num_blocks(rows, rows_per_block) blocks."""
    import ray

    return ray.data.read_parquet(str(path),
                                 override_num_blocks=num_blocks(parquet_rows(path), rows_per_block))


def from_table(table: pa.Table, rows_per_block: int) -> Any:
    """A dataset of `table` in num_blocks(rows, rows_per_block) blocks, in its row order."""
    import ray

    size = -(-table.num_rows // num_blocks(table.num_rows, rows_per_block))
    return ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)]
                               or [table])
