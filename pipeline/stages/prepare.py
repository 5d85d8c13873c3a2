"""prepare: input files → validated, tokenised pairs (+ quarantine of the rows that failed).

Input files (see `source_format`): parquet, JSON Lines, JSON arrays, and Arrow IPC streams as
HF `datasets` writes them (``save_to_disk`` directories and the datasets cache; config's
`expand_paths` turns those into their .arrow files). The driver reads only metadata (parquet
footers, arrow batch lengths, the newline positions of JSON Lines) and splits every file
into units of at most `rows_per_part` rows (a JSON array is one unit); Ray Data maps
`PrepareUnit` over the units. Each unit reads its rows (any pyarrow filesystem: local paths
or URIs such as ``file://``, ``s3://``, ``gs://``), validates and tokenises them, writes its pairs as one part file
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

from pipeline.config import ConfigError, PrepareConfig
from pipeline.data import BadRow, normalize_row, row_json, tokenize_pair

PAIR_SCHEMA = pa.schema([
    # prompt_text: the last user turn (what a reward function reads); prompt_messages: the
    # whole conversation as JSON (what a reward model reads); prompt_ids: as the policy sees it
    ("id", pa.string()), ("prompt_text", pa.string()), ("prompt_messages", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
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
    + [("quarantine", pa.list_(pa.struct(list(QUARANTINE_SCHEMA)))),
       ("filtered", pa.list_(pa.struct(list(QUARANTINE_SCHEMA))))])


def source_format(path: str) -> str:
    """parquet, jsonl, json (refined by `_json_kind`: a .json file may hold JSON Lines, as
    `Dataset.to_json` writes) or arrow (an HF `datasets` shard); other names are parquet."""
    name = path.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return "json" if name.endswith(".json") else "arrow" if name.endswith(".arrow") else "parquet"


@contextlib.contextmanager
def input_file(path: str, what: str) -> Iterator[pa.NativeFile]:
    """A random-access file by local path (memory-mapped) or by URI on any pyarrow
    filesystem; errors (also those raised while it is read) name the file."""
    try:
        if "://" in path:
            fs, inner = pafs.FileSystem.from_uri(path)
            source = fs.open_input_file(inner)
        else:
            source = pa.memory_map(path)
        with source:
            yield source
    except (OSError, pa.ArrowException) as err:  # pyarrow raises several types for a bad file
        raise ConfigError(f"{path}: cannot read as {what}: {err}") from None


@contextlib.contextmanager
def parquet_file(path: str) -> Iterator[pq.ParquetFile]:
    with input_file(path, "parquet") as source:
        yield pq.ParquetFile(source)


def arrow_table(source: pa.NativeFile) -> pa.Table:
    """An Arrow IPC stream (what `datasets` writes) or file; zero-copy when memory-mapped."""
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


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


UNIT_KEYS = ("part", "path", "format", "row_group", "start", "length", "first_row")
_CHUNK = 16 << 20  # bytes scanned at a time for the newlines of JSON Lines


def row_group_units(paths: list[str], rows_per_part: int = 4096) -> list[dict[str, Any]]:
    """Units of work in source order, each at most `rows_per_part` rows of one file;
    `first_row` is the index in its file of the unit's first row (for JSON Lines its line).
    parquet: `start`/`length` rows of row group `row_group`; arrow: rows of the file;
    jsonl: `start`/`length` bytes (whole lines); json (an array): the whole file."""
    units: list[dict[str, Any]] = []
    for path in paths:
        for unit in _file_units(path, rows_per_part):
            units.append({"part": len(units), "path": path, **unit})
    return units


def _file_units(path: str, rows_per_part: int) -> Iterator[dict[str, Any]]:
    fmt = source_format(path)
    if fmt == "parquet":
        with parquet_file(path) as f:
            meta = f.metadata
        first = 0
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            for start in range(0, n, rows_per_part):
                yield {"format": fmt, "row_group": rg, "start": start,
                       "length": min(rows_per_part, n - start), "first_row": first + start}
            first += n
    elif fmt == "arrow":
        with input_file(path, "arrow (HF datasets)") as f:
            n = arrow_table(f).num_rows
        for start in range(0, n, rows_per_part):
            yield {"format": fmt, "row_group": 0, "start": start,
                   "length": min(rows_per_part, n - start), "first_row": start}
    else:
        with input_file(path, "JSON") as f:
            size = f.size()
            if fmt == "json" and _first_byte(f) == b"[":
                yield {"format": "json", "row_group": 0, "start": 0, "length": size,
                       "first_row": 0}
                return
            starts = _line_starts(f, size, rows_per_part)
        for i, (a, b) in enumerate(zip(starts, starts[1:] + [size])):
            if a < size:
                yield {"format": "jsonl", "row_group": 0, "start": a, "length": b - a,
                       "first_row": i * rows_per_part}


def _first_byte(f: pa.NativeFile) -> bytes:
    head = f.read_at(min(f.size(), 4096), 0).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1]


def _line_starts(f: pa.NativeFile, size: int, rows_per_part: int) -> list[int]:
    """Byte offsets where lines 0, k, 2k, … start (k = rows_per_part), from a vectorised scan
    for newlines: no row is parsed here."""
    starts, lines, pos = [0], 0, 0
    while pos < size:
        chunk = np.frombuffer(f.read_at(min(_CHUNK, size - pos), pos), np.uint8)
        newlines = np.flatnonzero(chunk == 10)
        line_after = lines + 1 + np.arange(len(newlines))
        starts += (pos + newlines[line_after % rows_per_part == 0] + 1).tolist()
        lines, pos = lines + len(newlines), pos + len(chunk)
    return starts


def read_unit(path: str, fmt: str, row_group: int, start: int, length: int, first_row: int
              ) -> list[tuple[int, Any, BadRow | None]]:
    """(row index in the file, row, None) per row of a unit; a JSON line that cannot be a
    row comes back as (index, its text, BadRow) so it is quarantined with the others."""
    if fmt == "parquet":
        with parquet_file(path) as f:
            table = f.read_row_group(row_group).slice(start, length)
    elif fmt == "arrow":
        with input_file(path, "arrow (HF datasets)") as f:
            table = arrow_table(f).slice(start, length)
    else:
        with input_file(path, "JSON") as f:
            data = f.read_at(length, start)
        return _json_rows(path, data, first_row) if fmt == "json" else \
            _json_lines(data, first_row, first=start == 0)
    return [(first_row + i, row, None) for i, row in enumerate(table_rows(table))]


def file_rows(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(row index, row) of every row of one input file of any format, read here (for small
    files such as the prompt lists online rounds sample from); a row that is not a JSON
    object stops it with an error naming the file and row."""
    out = []
    for u in row_group_units([path], rows_per_part=1 << 40):
        for i, row, error in read_unit(*(u[k] for k in UNIT_KEYS[1:])):
            if error is not None:
                raise ConfigError(f"{path}: row {i}: {error}")
            out.append((i, row))
    return out


def _json_rows(path: str, data: bytes, first_row: int) -> list[tuple[int, Any, BadRow | None]]:
    """A JSON array of row objects (LLaMA-Factory's files); the file must parse as a whole."""
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err.msg} at line {err.lineno} column"
                          f" {err.colno}") from None
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: expected a JSON array of row objects (or JSON Lines),"
                          f" got a JSON {type(rows).__name__}")
    return [(first_row + i, row, None if isinstance(row, dict) else BadRow(
        "wrong_type", f"row: expected a JSON object, got {type(row).__name__}"))
        for i, row in enumerate(rows)]


def _json_lines(data: bytes, first_row: int, first: bool) -> list[tuple[int, Any, BadRow | None]]:
    """One row object per line; blank lines are skipped (and keep their line number)."""
    out: list[tuple[int, Any, BadRow | None]] = []
    for i, line in enumerate(data.split(b"\n")):
        if first and i == 0:
            line = line.removeprefix(b"\xef\xbb\xbf")
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            out.append((first_row + i, line.decode("utf-8", "replace"), BadRow(
                "undecodable_text", f"line {first_row + i + 1}: not UTF-8 ({err.reason} at"
                f" byte {err.start})")))
            continue
        except json.JSONDecodeError as err:
            out.append((first_row + i, line.decode(), BadRow(
                "bad_json", f"line {first_row + i + 1}: {err.msg} at column {err.colno}")))
            continue
        out.append((first_row + i, row, None if isinstance(row, dict) else BadRow(
            "wrong_type", f"line {first_row + i + 1}: expected a JSON object, got"
            f" {type(row).__name__}")))
    return out


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
                 requires_scores: bool, parts_dir: str, min_score_margin: float | None = None):
        from transformers import AutoTokenizer

        self.cfg = PrepareConfig.model_validate(data_cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path,
                                                       trust_remote_code=trust_remote_code)
        self.requires_scores = requires_scores or min_score_margin is not None
        self.min_score_margin = min_score_margin
        self.parts_dir = Path(parts_dir)

    def __call__(self, units: dict[str, np.ndarray]) -> pa.Table:
        return pa.Table.from_pylist([self.unit(*(u.item() if hasattr(u, "item") else u
                                                 for u in values))
                                     for values in zip(*(units[k] for k in UNIT_KEYS))],
                                    SUMMARY_SCHEMA)

    def unit(self, part: int, path: str, format: str, row_group: int, start: int, length: int,
             first_row: int) -> dict[str, Any]:
        good, bad, filtered = [], [], []
        for source_row, row, error in read_unit(path, format, row_group, start, length,
                                                first_row):
            where = {"source_file": path, "source_row": source_row}
            try:
                if error is not None:
                    raise error
                pair = normalize_row(row, self.cfg, self.requires_scores)
                gap = pair.chosen_score - pair.rejected_score
                if self.min_score_margin is not None and not gap > self.min_score_margin:
                    filtered.append({**where, "id": pair.id or None, "reason": "score_margin",
                                     "detail": f"chosen_score - rejected_score = {gap:.4g} is not"
                                     f" above data.min_score_margin {self.min_score_margin:g}",
                                     "row_json": row_json(row)})
                    continue
                out = tokenize_pair(pair, self.tokenizer, self.cfg)
                out["id"] = out["id"] or f"{Path(path).name}:{where['source_row']}"
                good.append({**out, **where})
            except BadRow as err:
                row_id = row.get(self.cfg.fields.id) if isinstance(row, dict) else None
                bad.append({**where, "id": None if row_id is None else str(row_id),
                            "reason": err.reason, "detail": err.detail, "row_json": row_json(row)})
        tmp = self.parts_dir / f".part-{part:06d}.tmp"
        pq.write_table(pa.Table.from_pylist(good, PAIR_SCHEMA), tmp)
        tmp.rename(self.parts_dir / f"part-{part:06d}.parquet")  # atomic: a retried unit rewrites it
        truncated = collections.Counter(g["truncated"] for g in good)
        return {"part": part, "truncated": json.dumps(truncated), "quarantine": bad,
                "filtered": filtered,
                **{f"{k}_len": [len(g[f"{k}_ids"]) for g in good] for k in LENGTHS}}


def run_prepare(paths: list[str], tokenizer_path: str, data_cfg: PrepareConfig, out_dir: Path,
                trust_remote_code: bool, concurrency: int = 2, requires_scores: bool = False,
                rows_per_part: int = 4096, console: Console | None = None,
                min_score_margin: float | None = None) -> dict[str, Any]:
    """Validate + tokenise `paths` into out_dir/pairs.parquet/ (part files) and
    out_dir/quarantine.parquet; print the summary tables; stop over the quarantine limit.
    `min_score_margin`: valid pairs whose chosen score is not above the rejected one's by
    more than this are left out (needs scores) and kept in out_dir/filtered.parquet."""
    import ray

    units = row_group_units(expand_uris(paths), rows_per_part)
    parts_dir = out_dir / "pairs.parquet"
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), 256)))
    actors = ray.data.ActorPoolStrategy(size=max(1, min(concurrency, len(units))))
    ds = ds.map_batches(
        PrepareUnit, fn_constructor_args=(
            tokenizer_path, data_cfg.model_dump(include=set(PrepareConfig.model_fields)),
            trust_remote_code, requires_scores, str(parts_dir.resolve()), min_score_margin),
        batch_size=1, compute=actors, num_cpus=0.5, batch_format="numpy")
    summary = pa.concat_tables([SUMMARY_SCHEMA.empty_table(), *ray.get(ds.to_arrow_refs())])
    quarantine = pa.Table.from_pylist(
        [q for qs in summary.column("quarantine").to_pylist() for q in qs], QUARANTINE_SCHEMA)
    pq.write_table(quarantine, out_dir / "quarantine.parquet")
    filtered = pa.Table.from_pylist(
        [q for qs in summary.column("filtered").to_pylist() for q in qs], QUARANTINE_SCHEMA)
    if min_score_margin is not None:
        pq.write_table(filtered, out_dir / "filtered.parquet")
    truncated: collections.Counter[str] = collections.Counter()
    for counts in summary.column("truncated").to_pylist():
        truncated.update(json.loads(counts))
    lengths = {k: np.concatenate([np.asarray(v, dtype=np.int64) for v in
                                  summary.column(f"{k}_len").to_pylist()] or [np.zeros(0)])
               for k in LENGTHS}
    pairs = len(lengths["prompt"])
    total = pairs + quarantine.num_rows + filtered.num_rows
    reasons = collections.Counter(quarantine.column("reason").to_pylist())
    stats = {"rows_in": total, "pairs": pairs, "quarantined": quarantine.num_rows,
             **({"filtered": filtered.num_rows} if min_score_margin is not None else {}),
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
    if "filtered" in stats:
        rows.add_row("left out: score margin", str(stats["filtered"]),
                     f"{stats['filtered'] / total:.1%}")
    for kind, n in sorted(stats["truncated"].items()):
        if kind != "none":
            rows.add_row(f"kept, truncated: {kind}", str(n), f"{n / total:.1%}")
    lengths = Table(title="tokens (truncated)", box=box.SIMPLE_HEAD, show_edge=False)
    for col in ("", "p50", "p95", "max"):
        lengths.add_column(col, justify="left" if not col else "right")
    for name, s in stats["lengths"].items():
        lengths.add_row(name, *(f"{s[k]:.0f}" for k in ("p50", "p95", "max")))
    return [rows, lengths]
