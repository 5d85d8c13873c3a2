"""prepare: parquet files → validated, tokenised pairs (+ quarantine of the rows that failed).

Rows are read by Ray Data in units of parquet row groups so each row keeps its source
file and row index; a quarantined row can be found and fixed in its original file.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ConfigError, DataConfig
from pipeline.data import BadRow, normalize_row, row_json, tokenize_pair

PAIR_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt_text", pa.string()), ("prompt_ids", pa.list_(pa.int32())), ("chosen_ids", pa.list_(pa.int32())),
    ("rejected_ids", pa.list_(pa.int32())), ("chosen_score", pa.float64()),
    ("rejected_score", pa.float64()), ("truncated", pa.string()),
    ("source_file", pa.string()), ("source_row", pa.int64()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("source_file", pa.string()), ("source_row", pa.int64()), ("id", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("row_json", pa.string()),
])


def row_group_units(paths: list[str]) -> list[dict[str, Any]]:
    """One unit per parquet row group: (file, row group, index of its first row)."""
    units = []
    for path in paths:
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise ConfigError(f"{path}: cannot read as parquet: {err}") from None
        first = 0
        for rg in range(meta.num_row_groups):
            units.append({"path": path, "row_group": rg, "first_row": first})
            first += meta.row_group(rg).num_rows
    return units


class PrepareUnit:
    """Ray Data UDF: reads row groups, emits a table of pairs and quarantined rows."""

    def __init__(self, tokenizer_path: str, data_cfg: dict[str, Any], trust_remote_code: bool):
        from transformers import AutoTokenizer

        self.cfg = DataConfig.model_validate(data_cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path,
                                                       trust_remote_code=trust_remote_code)

    def __call__(self, units: dict[str, np.ndarray]) -> pa.Table:
        good, bad = [], []
        for path, rg, first in zip(units["path"], units["row_group"], units["first_row"]):
            table = pq.ParquetFile(path).read_row_group(int(rg))
            for offset, row in enumerate(table.to_pylist()):
                where = {"source_file": str(path), "source_row": int(first) + offset}
                try:
                    pair = normalize_row(row, self.cfg)
                    out = tokenize_pair(pair, self.tokenizer, self.cfg)
                    if not out["id"]:
                        out["id"] = f"{Path(str(path)).name}:{where['source_row']}"
                    good.append({**out, **where})
                except BadRow as err:
                    row_id = row.get(self.cfg.fields.id)
                    bad.append({**where, "id": None if row_id is None else str(row_id),
                                "reason": err.reason, "detail": err.detail, "row_json": row_json(row)})
        # One table, one schema: quarantined rows have null pair columns and vice versa.
        return pa.concat_tables([pa.Table.from_pylist(good, PAIR_SCHEMA),
                                 pa.Table.from_pylist(bad, QUARANTINE_SCHEMA)],
                                promote_options="default")


def run_prepare(paths: list[str], tokenizer_path: str, data_cfg: DataConfig, out_dir: Path,
                trust_remote_code: bool, concurrency: int = 2) -> dict[str, Any]:
    """Validate + tokenise `paths` into out_dir/pairs.parquet and out_dir/quarantine.parquet."""
    import ray

    units = row_group_units(paths)
    ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), 64)))
    ds = ds.map_batches(
        PrepareUnit, fn_constructor_args=(tokenizer_path, data_cfg.model_dump(), trust_remote_code),
        batch_size=1, concurrency=max(1, min(concurrency, len(units))), num_cpus=0.5,
        batch_format="numpy").materialize()
    unified = pa.unify_schemas([PAIR_SCHEMA, QUARANTINE_SCHEMA])
    both = pa.concat_tables([unified.empty_table(), *ray.get(ds.to_arrow_refs())],
                            promote_options="default")
    is_bad = pc.is_valid(both.column("reason"))
    pairs = both.filter(pc.invert(is_bad)).select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)
    quarantine = both.filter(is_bad).select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
    pairs = pairs.sort_by([("source_file", "ascending"), ("source_row", "ascending")])
    quarantine = quarantine.sort_by([("source_file", "ascending"), ("source_row", "ascending")])
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pairs, out_dir / "pairs.parquet")
    pq.write_table(quarantine, out_dir / "quarantine.parquet")
    total = pairs.num_rows + quarantine.num_rows
    reasons = collections.Counter(quarantine.column("reason").to_pylist())
    truncated = collections.Counter(pairs.column("truncated").to_pylist())
    stats = {"rows_in": total, "pairs": pairs.num_rows, "quarantined": quarantine.num_rows,
             "quarantine_reasons": dict(reasons), "truncated": dict(truncated),
             "lengths": length_stats(pairs)}
    fraction = quarantine.num_rows / max(total, 1)
    if fraction > data_cfg.max_quarantine_fraction:
        raise ConfigError(
            f"{quarantine.num_rows} of {total} rows ({fraction:.1%}) failed validation, over"
            f" data.max_quarantine_fraction={data_cfg.max_quarantine_fraction:.1%}; reasons:"
            f" {dict(reasons)}; see {out_dir / 'quarantine.parquet'}")
    return stats


def length_stats(pairs: pa.Table) -> dict[str, dict[str, float]]:
    out = {}
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        lengths = np.array([len(x) for x in pairs.column(col).to_pylist()] or [0])
        out[col.removesuffix("_ids")] = {"p50": float(np.percentile(lengths, 50)),
                                         "p95": float(np.percentile(lengths, 95)),
                                         "max": float(lengths.max())}
    return out
