"""reference: the reference model's log-probs of chosen and rejected, on the run's vLLM engines.

Computed once per (reference weights, tokenizer + chat template, prepared data, length
settings) and cached under that key; the trainer never holds a reference model.
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import PoolConfig
from pipeline.console import console
from pipeline.manifest import Manifest, model_digest, stable_hash, write_json_atomic


def cache_key(reference_path: str, tokenizer_path: str, data_key: str, lengths: dict[str, Any],
              engine_dtype: str, kl_pairs: bool = False) -> str:
    """`kl_pairs`: the mismatched-completion columns are computed too (see PairLogprobs)."""
    return stable_hash({"reference": model_digest(reference_path),
                        "tokenizer": model_digest(tokenizer_path), "data": data_key,
                        "lengths": lengths, "dtype": engine_dtype,
                        **({"kl_pairs": True} if kl_pairs else {})})


def compute_reference(splits: dict[str, Path], client: Any, pool: PoolConfig, out_dir: Path,
                      kl_pairs: bool = False) -> dict[str, int]:
    """For each split's pairs.parquet write out_dir/<split>/ (parquet) with ref columns
    (and the mismatched completions' with `kl_pairs`), computed by the engines of `client`
    (a workers.vllm_pool.EngineClient serving the reference weights)."""
    from ray.data.expressions import col

    from pipeline.blocks import parquet_rows, read_parquet
    from pipeline.engines import fused_write_args, map_args
    from workers.vllm_pool import PairLogprobs

    # One pool over all splits, so the splits must share one schema: sampled pairs carry win
    # rates that prepared eval pairs lack, and Ray Data takes a union's schema from whichever
    # block comes first. Every split gets every column (nulls where it has none).
    schemas = {name: pq.ParquetDataset(str(path)).schema for name, path in splits.items()}
    fields = {f.name: f for schema in schemas.values() for f in schema}

    def conform(batch: pa.Table, split: str) -> pa.Table:
        for name, f in fields.items():
            if name not in batch.column_names:
                batch = batch.append_column(f, pa.nulls(batch.num_rows, f.type))
        return batch.select(list(fields)).append_column("split", pa.array([split] * len(batch)))

    tagged = [read_parquet(path, pool.batch_size).map_batches(
        conform, fn_kwargs={"split": name}, batch_format="pyarrow")
        for name, path in splits.items()]
    ds = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
    ds = ds.map_batches(PairLogprobs(client, "ref", kl_pairs), batch_format="pyarrow",
                        **map_args(pool))
    if len(splits) > 1:  # computed once, then each split filtered out of it
        ds = ds.materialize()
    rows = {}
    for name in splits:
        part = ds if len(splits) == 1 else ds.filter(expr=col("split") == name)
        part.drop_columns(["split", *(f for f in fields if f not in schemas[name].names)]) \
            .write_parquet(str(out_dir / name),  # one split: the write in the engine tasks
                           **(fused_write_args(map_args(pool)) if len(splits) == 1 else {}))
        rows[name] = parquet_rows(out_dir / name)
    return rows


def run_reference(splits: dict[str, Path], keys: dict[str, str], cache_root: Path,
                  client: Callable[[], Any], pool: PoolConfig, kl_pairs: bool = False
                  ) -> dict[str, Any]:
    """Reference log-probs of each split, cached per split under its key (`keys[split]`):
    an online round's eval split, the same every round, is computed once. The splits the
    cache lacks are computed together; `client()` gives the engines' client (called only
    then: a run whose splits are all cached starts no engine).
    Returns {'paths': {split: dir}, 'rows': {split: n}, 'computed': [split, ...]}."""
    cache_root.mkdir(parents=True, exist_ok=True)
    # Runs of a sweep share one cache: one run at a time computes what it misses while the
    # others wait on the lock (released by the OS if its holder dies), then find theirs cached.
    with _locked(cache_root / ".lock"):
        paths, rows, missing = _cached(splits, keys, cache_root)
        if missing:
            _compute_into_cache(missing, keys, cache_root, client(), pool, kl_pairs, rows, paths)
    return {"paths": paths, "rows": rows, "computed": sorted(missing)}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`; where the filesystem has no locks (some NFS/FUSE mounts),
    a warning and no lock (runs sharing such a cache could compute a key twice)."""
    with path.open("a") as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                console.print(f"  reference cache {path.parent}: another run is computing into"
                              " it; waiting", soft_wrap=True)
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as err:
            console.print(f"  [yellow]warning[/]: reference cache {path.parent}: no file lock"
                          f" on this filesystem ({err}); runs sharing it may compute a key twice",
                          soft_wrap=True)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(splits: dict[str, Path], keys: dict[str, str], cache_root: Path):
    """(paths, rows) of the splits the cache holds under their keys, and the missing ones."""
    paths, rows, missing = {}, {}, {}
    for name, path in splits.items():
        target = cache_root / keys[name]
        done = Manifest.read(target)
        if done is not None and done.key == keys[name]:
            paths[name], rows[name] = str(target / name), done.outputs["rows"][name]
        else:
            missing[name] = path
    return paths, rows, missing


def _compute_into_cache(missing: dict[str, Path], keys: dict[str, str], cache_root: Path,
                        client: Any, pool: PoolConfig, kl_pairs: bool, rows: dict[str, int],
                        paths: dict[str, str]) -> None:
    """Compute the missing splits together, then move each into the cache under its key."""
    tmp = cache_root / f"{stable_hash(sorted(keys[n] for n in missing))}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    computed = compute_reference(missing, client, pool, tmp, kl_pairs=kl_pairs)
    for name in missing:
        key, target = keys[name], cache_root / keys[name]
        part = tmp / key
        part.mkdir()
        (tmp / name).rename(part / name)
        write_json_atomic(part / "manifest.json", Manifest(
            "reference-cache", key, {}, {"rows": {name: computed[name]}}, 0.0, 0.0).__dict__)
        shutil.rmtree(target, ignore_errors=True)
        part.rename(target)
        paths[name], rows[name] = str(target / name), computed[name]
    shutil.rmtree(tmp, ignore_errors=True)
