"""reference: the reference model's log-probs of chosen and rejected, on a vLLM actor pool.

Computed once per (reference weights, tokenizer + chat template, prepared data, length
settings) and cached under that key; the trainer never holds a reference model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config import ActorPoolConfig, PoolConfig
from pipeline.manifest import Manifest, model_digest, stable_hash, write_json_atomic


def cache_key(reference_path: str, tokenizer_path: str, data_key: str, lengths: dict[str, Any],
              engine_dtype: str) -> str:
    return stable_hash({"reference": model_digest(reference_path),
                        "tokenizer": model_digest(tokenizer_path), "data": data_key,
                        "lengths": lengths, "dtype": engine_dtype})


def pool_map_args(pool: ActorPoolConfig) -> dict[str, Any]:
    """map_batches arguments for a pool of actors (engines, scorers)."""
    args = {"concurrency": pool.num_actors, "num_cpus": pool.cpus_per_actor,
            "num_gpus": pool.gpus_per_actor or None, "batch_size": pool.batch_size}
    if pool.resources:  # custom resources pin the pool to node types
        args["resources"] = dict(pool.resources)
    return args


def compute_reference(splits: dict[str, Path], reference_path: str, pool: PoolConfig,
                      trust_remote_code: bool, out_dir: Path, udf: type | None = None) -> dict[str, int]:
    """For each split's pairs.parquet write out_dir/<split>/ (parquet) with ref columns.

    `udf` replaces the engine actor class (default `workers.vllm_pool.PairLogprobs`)."""
    import ray

    from workers.vllm_pool import PairLogprobs

    tagged = [ray.data.read_parquet(str(path)).add_column(
        "split", lambda b, s=name: pa.array([s] * len(b)), batch_format="pyarrow")
        for name, path in splits.items()]
    ds = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
    ds = ds.map_batches(udf or PairLogprobs, fn_constructor_args=(reference_path, pool.engine.model_dump(),
                                                           trust_remote_code, "ref"),
                        batch_format="pyarrow", **pool_map_args(pool)).materialize()
    rows = {}
    for name in splits:
        part = ds.filter(lambda r, s=name: r["split"] == s).drop_columns(["split"])
        part.write_parquet(str(out_dir / name))
        rows[name] = part.count()
    return rows


def run_reference(splits: dict[str, Path], key: str, cache_root: Path, reference_path: str,
                  pool: PoolConfig, trust_remote_code: bool) -> dict[str, Any]:
    """Cached reference log-probs: returns {'cache_dir', 'rows', 'cache_hit'}."""
    target = cache_root / key
    done = Manifest.read(target)
    if done is not None and done.key == key:
        return {"cache_dir": str(target), "rows": done.outputs["rows"], "cache_hit": True}
    tmp = cache_root / f"{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = compute_reference(splits, reference_path, pool, trust_remote_code, tmp)
    write_json_atomic(tmp / "manifest.json", Manifest("reference-cache", key, {}, {"rows": rows},
                                                      0.0, 0.0).__dict__)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return {"cache_dir": str(target), "rows": rows, "cache_hit": False}
