"""prepare: parquet files → validated, tokenised pairs (+ quarantine of the rows that failed).

The driver only reads parquet footers: it splits every input row group into units of at
most `rows_per_part` rows, and Ray Data maps `PrepareUnit` over the units. Each unit reads
its rows (any pyarrow filesystem: local paths or URIs such as ``file://``, ``s3://``,
``gs://``), validates and tokenises them, writes its pairs as one part file
``pairs.parquet/part-<unit>.parquet`` (the parts sort in source order, and there are as
many as the data needs, so later stages read them as many blocks), and returns a summary
row: quarantined rows with their source file and row index, truncation counts, lengths.
"""

from __future__ import annotations

import collections
import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from rich import box
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, DataConfig
from pipeline.data import BadRow, normalize_row, row_json, tokenize_pair

PAIR_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt_text", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
    ("chosen_ids", pa.list_(pa.int32())), ("rejected_ids", pa.list_(pa.int32())),
    ("chosen_score", pa.float64()), ("rejected_score", pa.float64()), ("truncated", pa.string()),
    ("source_file", pa.string()), ("source_row", pa.int64()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("source_file", pa.string()), ("source_row", pa.int64()), ("id", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("row_json", pa.string()),
])
LENGTHS = ("prompt", "chosen", "rejected")
SUMMARY_SCHEMA = pa.schema(
    [("part", pa.int64()), ("truncated", pa.string())]
    + [(f"{k}_len", pa.list_(pa.int32())) for k in LENGTHS]
    + [("quarantine", pa.list_(pa.struct(list(QUARANTINE_SCHEMA))))])


@contextlib.contextmanager
def parquet_file(path: str) -> Iterator[pq.ParquetFile]:
    """A parquet file by local path or by URI on any pyarrow filesystem; errors name the file."""
    try:
        with contextlib.ExitStack() as stack:
            if "://" in path:
                fs, inner = pafs.FileSystem.from_uri(path)
                source: Any = stack.enter_context(fs.open_input_file(inner))
            else:
                source = path
            yield pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as err:  # pyarrow raises several types for a bad file
        raise ConfigError(f"{path}: cannot read as parquet: {err}") from None


def expand_uris(paths: list[str]) -> list[str]:
    """Local paths as given; a URI naming a directory becomes its .parquet files, sorted."""
    out: list[str] = []
    for path in paths:
        if "://" not in path:
            out.append(path)
            continue
        fs, inner = pafs.FileSystem.from_uri(path)
        if fs.get_file_info(inner).type != pafs.FileType.Directory:
            out.append(path)
            continue
        scheme = path.split("://", 1)[0]
        found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                       if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
        if not found:
            raise ConfigError(f"{path}: directory holds no .parquet files")
        out.extend(f"{scheme}://{p}" for p in found)
    return out


def row_group_units(paths: list[str], rows_per_part: int = 4096) -> list[dict[str, Any]]:
    """Units of work: slices of at most `rows_per_part` rows of one row group, in source
    order; `first_row` is the index in its file of the slice's first row."""
    units = []
    for path in paths:
        with parquet_file(path) as f:
            meta = f.metadata
        first = 0
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            for start in range(0, n, rows_per_part):
                units.append({"part": len(units), "path": path, "row_group": rg, "start": start,
                              "length": min(rows_per_part, n - start), "first_row": first + start})
            first += n
    return units


def _binary_text(t: pa.DataType) -> pa.DataType:
    """`t` with every string type replaced by binary: such a cast never fails on bad UTF-8."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.binary()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(_binary_text(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _binary_text(f.type)) for f in t])
    return t


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as dicts; a row whose text is not UTF-8 comes back with bytes, so validation
    can quarantine it (``undecodable_text``) instead of the whole file failing."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        raw = table.cast(pa.schema([pa.field(f.name, _binary_text(f.type)) for f in table.schema]))
        return [{name: _value(table, raw, name, i) for name in table.column_names}
                for i in range(table.num_rows)]


def _value(table: pa.Table, raw: pa.Table, name: str, i: int) -> Any:
    try:
        return table.column(name)[i].as_py()
    except UnicodeDecodeError:
        return raw.column(name)[i].as_py()


class PrepareUnit:
    """Ray Data UDF: validates and tokenises units, writes pair parts, returns summaries."""

    def __init__(self, tokenizer_path: str, data_cfg: dict[str, Any], trust_remote_code: bool,
                 requires_scores: bool, parts_dir: str):
        from transformers import AutoTokenizer

        self.cfg = DataConfig.model_validate(data_cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path,
                                                       trust_remote_code=trust_remote_code)
        self.requires_scores = requires_scores
        self.parts_dir = Path(parts_dir)

    def __call__(self, units: dict[str, np.ndarray]) -> pa.Table:
        keys = ("part", "path", "row_group", "start", "length", "first_row")
        return pa.Table.from_pylist([self.unit(*(u.item() if hasattr(u, "item") else u
                                                 for u in values))
                                     for values in zip(*(units[k] for k in keys))], SUMMARY_SCHEMA)

    def unit(self, part: int, path: str, row_group: int, start: int, length: int,
             first_row: int) -> dict[str, Any]:
        with parquet_file(path) as f:
            table = f.read_row_group(row_group).slice(start, length)
        good, bad = [], []
        for offset, row in enumerate(table_rows(table)):
            where = {"source_file": path, "source_row": first_row + offset}
            try:
                out = tokenize_pair(normalize_row(row, self.cfg, self.requires_scores),
                                    self.tokenizer, self.cfg)
                out["id"] = out["id"] or f"{Path(path).name}:{where['source_row']}"
                good.append({**out, **where})
            except BadRow as err:
                row_id = row.get(self.cfg.fields.id)
                bad.append({**where, "id": None if row_id is None else str(row_id),
                            "reason": err.reason, "detail": err.detail, "row_json": row_json(row)})
        tmp = self.parts_dir / f".part-{part:06d}.tmp"
        pq.write_table(pa.Table.from_pylist(good, PAIR_SCHEMA), tmp)
        tmp.rename(self.parts_dir / f"part-{part:06d}.parquet")  # atomic: a retried unit rewrites it
        truncated = collections.Counter(g["truncated"] for g in good)
        return {"part": part, "truncated": json.dumps(truncated), "quarantine": bad,
                **{f"{k}_len": [len(g[f"{k}_ids"]) for g in good] for k in LENGTHS}}


def run_prepare(paths: list[str], tokenizer_path: str, data_cfg: DataConfig, out_dir: Path,
                trust_remote_code: bool, concurrency: int = 2, requires_scores: bool = False,
                rows_per_part: int = 4096, console: Console | None = None) -> dict[str, Any]:
    """Validate + tokenise `paths` into out_dir/pairs.parquet/ (part files) and
    out_dir/quarantine.parquet; print the summary tables; stop over the quarantine limit."""
    import ray

    units = row_group_units(expand_uris(paths), rows_per_part)
    parts_dir = out_dir / "pairs.parquet"
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), 256)))
    ds = ds.map_batches(
        PrepareUnit, fn_constructor_args=(tokenizer_path, data_cfg.model_dump(), trust_remote_code,
                                          requires_scores, str(parts_dir.resolve())),
        batch_size=1, concurrency=max(1, min(concurrency, len(units))), num_cpus=0.5,
        batch_format="numpy")
    summary = pa.concat_tables([SUMMARY_SCHEMA.empty_table(), *ray.get(ds.to_arrow_refs())])
    quarantine = pa.Table.from_pylist(
        [q for qs in summary.column("quarantine").to_pylist() for q in qs], QUARANTINE_SCHEMA)
    pq.write_table(quarantine, out_dir / "quarantine.parquet")
    truncated: collections.Counter[str] = collections.Counter()
    for counts in summary.column("truncated").to_pylist():
        truncated.update(json.loads(counts))
    lengths = {k: np.concatenate([np.asarray(v, dtype=np.int64) for v in
                                  summary.column(f"{k}_len").to_pylist()] or [np.zeros(0)])
               for k in LENGTHS}
    pairs = len(lengths["prompt"])
    total = pairs + quarantine.num_rows
    reasons = collections.Counter(quarantine.column("reason").to_pylist())
    stats = {"rows_in": total, "pairs": pairs, "quarantined": quarantine.num_rows,
             "parts": len(units), "quarantine_reasons": dict(reasons),
             "truncated": dict(truncated), "lengths": length_stats(lengths)}
    (console or Console()).print(*report_tables(stats))
    fraction = quarantine.num_rows / max(total, 1)
    if fraction > data_cfg.max_quarantine_fraction:
        raise ConfigError(
            f"{quarantine.num_rows} of {total} rows ({fraction:.1%}) failed validation, over"
            f" data.max_quarantine_fraction={data_cfg.max_quarantine_fraction:.1%}; reasons:"
            f" {dict(reasons)}; see {out_dir / 'quarantine.parquet'}")
    return stats


def length_stats(lengths: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """p50 / p95 / max tokens of prompts and responses (after truncation)."""
    out = {}
    for name, values in lengths.items():
        v = values if len(values) else np.zeros(1)
        out[name] = {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                     "max": float(v.max())}
    return out


def report_tables(stats: dict[str, Any]) -> list[Table]:
    """Rich tables for the console: rows by outcome and quarantine reason, truncation, lengths."""
    total = max(stats["rows_in"], 1)
    rows = Table(title=f"prepare: {stats['rows_in']} rows in {stats['parts']} parts",
                 box=box.SIMPLE_HEAD, show_edge=False, min_width=40)
    for col in ("outcome", "rows", "share"):
        rows.add_column(col, justify="left" if col == "outcome" else "right")
    rows.add_row("pairs", str(stats["pairs"]), f"{stats['pairs'] / total:.1%}")
    for reason, n in sorted(stats["quarantine_reasons"].items(), key=lambda kv: -kv[1]):
        rows.add_row(f"quarantined: {reason}", str(n), f"{n / total:.1%}")
    for kind, n in sorted(stats["truncated"].items()):
        if kind != "none":
            rows.add_row(f"kept, truncated: {kind}", str(n), f"{n / total:.1%}")
    lengths = Table(title="tokens (truncated)", box=box.SIMPLE_HEAD, show_edge=False)
    for col in ("", "p50", "p95", "max"):
        lengths.add_column(col, justify="left" if not col else "right")
    for name, s in stats["lengths"].items():
        lengths.add_row(name, *(f"{s[k]:.0f}" for k in ("p50", "p95", "max")))
    return [rows, lengths]
