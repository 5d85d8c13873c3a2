"""Preflight: what a config names on disk, checked before any cluster work, and the
config with its local paths made absolute (for the workers, which run elsewhere).

pipeline.config holds the schema and its validation; this module looks at the filesystem:
data paths and globs (expand_paths), the model directories (check_paths, lora_problems),
the run directory's free space, and with_absolute_paths.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from pipeline.config import ConfigError, RunConfig

DATA_SUFFIXES = (".parquet", ".json", ".jsonl", ".ndjson", ".arrow")
# an HF datasets name as `load_dataset` takes it, with an optional split: org/name:test
_DATASET_NAME = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*(/[\w.-]+)?)(:(?P<split>[\w.-]+))?$")


def expand_paths(patterns: list[str], what: str) -> list[str]:
    """The files behind `patterns`: local globs expanded, directories replaced by their
    .parquet files (a `datasets` ``save_to_disk`` directory by its .arrow shards), an HF
    datasets name (``org/name`` or ``name``, optional ``:split``, default ``train``) not
    found on disk resolved to its .arrow files in the local datasets cache, offline; remote
    URIs (s3://, gs://, …) are passed through to pyarrow."""
    out: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            out.append(pattern)
            continue
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            out.extend(_cached_dataset_files(pattern, what))
            continue
        for m in matches:
            if os.path.isdir(m):
                out.extend(_directory_files(m, what))
            else:
                out.append(m)
    return out


def _directory_files(path: str, what: str) -> list[str]:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits", [])
        raise ConfigError(f"{what}: {path!r} is a DatasetDict saved with save_to_disk (splits:"
                          f" {', '.join(splits)}); name one split's directory, e.g."
                          f" {os.path.join(path, splits[0] if splits else 'train')!r}")
    if os.path.isfile(os.path.join(path, "state.json")):  # Dataset.save_to_disk
        with open(os.path.join(path, "state.json")) as f:
            shards = [os.path.join(path, d["filename"]) for d in json.load(f)["_data_files"]]
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing or not shards:
            raise ConfigError(f"{what}: save_to_disk directory {path!r} lacks its shards"
                              f" {missing or '(none listed in state.json)'}")
        return shards
    found = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if not found:
        raise ConfigError(f"{what}: directory {path!r} holds no .parquet files (nor is it a"
                          " `datasets` save_to_disk directory)")
    return found


def _cached_dataset_files(pattern: str, what: str) -> list[str]:
    """An HF datasets name → the .arrow files of its split in the local datasets cache
    (HF_DATASETS_CACHE, read now), without the network; ConfigError if it is not there."""
    if not is_dataset_name(pattern):
        raise ConfigError(f"{what}: no file matches {pattern!r}")
    match = _DATASET_NAME.match(pattern)
    name, split = match["name"], match["split"] or "train"
    import datasets
    from datasets.packaged_modules.cache.cache import Cache

    cache_dir = os.environ.get("HF_DATASETS_CACHE") or str(datasets.config.HF_DATASETS_CACHE)
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # the cache builder warns on every lookup
    try:
        builder = Cache(cache_dir=cache_dir, repo_id=name, dataset_name=name.split("/")[-1],
                        version="auto", hash="auto")
        splits = list(builder.info.splits or {})
        if split not in splits:
            raise ConfigError(f"{what}: the cached dataset {name!r} has no split {split!r}"
                              f" (splits: {', '.join(splits)}); write {name}:SPLIT")
        return [f["filename"] for f in builder.as_dataset(split=split).cache_files]
    except ConfigError:
        raise
    except ValueError as err:  # the cache builder's error for a name it does not hold
        if "Couldn't find cache" not in str(err):
            raise ConfigError(f"{what}: {pattern!r} in the local HF datasets cache ({cache_dir}):"
                              f" {err}") from None
        raise ConfigError(f"{what}: {pattern!r} is neither a path nor a dataset in the local HF"
                          f" datasets cache ({cache_dir})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def is_dataset_name(value: str) -> bool:
    """`value` can only mean an HF datasets name: no such local path, no glob or URI, no
    data-file suffix, and spelled like ``org/name[:split]``."""
    return (_DATASET_NAME.match(value) is not None and not os.path.exists(value)
            and not value.lower().endswith(DATA_SUFFIXES))


def check_paths(cfg: RunConfig) -> list[str]:
    """Problems with local paths the run needs, each naming the key and the path."""
    problems: list[str] = []
    for key, value in (("model.policy", cfg.model.policy),
                       ("model.reference", cfg.model.reference_path),
                       ("model.tokenizer", cfg.model.tokenizer_path)):
        if _looks_local(value) and not Path(value).exists():
            problems.append(f"{key}: path does not exist: {value}")
    for key, patterns in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval),
                          ("rounds.prompts", cfg.rounds.prompts)):
        try:
            expand_paths(patterns, key)
        except ConfigError as err:
            problems.append(str(err))
    if cfg.reward and cfg.reward.model and _looks_local(cfg.reward.model) \
            and not Path(cfg.reward.model).exists():
        problems.append(f"reward.model: path does not exist: {cfg.reward.model}")
    if not cfg.model.allow_pickle_weights:
        for key, value in (("model.policy", cfg.model.policy),
                           ("model.reference", cfg.model.reference_path),
                           ("reward.model", cfg.reward.model if cfg.reward else None)):
            problems += _pickle_only(key, value)
    problems += lora_problems(cfg)
    problems += run_dir_problems(cfg.run_dir, cfg.min_free_gib)
    return problems


def lora_problems(cfg: RunConfig) -> list[str]:
    """model.lora against the policy's files (built on the meta device, nothing loaded):
    targets that are absent or not linear layers, a rank larger than a layer."""
    from workers.lora import inspect, is_adapter

    policy = cfg.model.policy
    if cfg.model.lora is None:
        return []
    if is_adapter(policy):
        return [(f"model.policy: {policy} is a LoRA adapter; give its base model (model.lora"
                 " trains new adapters on it)")]
    if not (Path(policy) / "config.json").is_file():
        return []  # a policy path check_paths already reports (or a hub id)
    try:
        inspect(policy, cfg.model.lora.model_dump(), cfg.model.trust_remote_code)
    except ValueError as err:
        return [str(err)]
    return []


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _pickle_only(key: str, model_dir: str | None) -> list[str]:
    """A local model directory whose weights exist only as pickle files (unsafe to load)."""
    root = Path(model_dir) if model_dir else None
    if root is None or not root.is_dir() or any(root.glob("*.safetensors")):
        return []
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        return []
    return [(f"{key}: {root} has only pickle weights ({', '.join(pickles[:3])}); loading them"
            " can run arbitrary code. Convert to safetensors, or set"
            " model.allow_pickle_weights: true if you trust the files")]


def run_dir_problems(run_dir: str, min_free_gib: float) -> list[str]:
    """run_dir must be creatable, writable, and have min_free_gib free (checked without
    creating it: the nearest existing parent is probed)."""
    if "://" in run_dir:
        return []
    path = Path(run_dir).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return [f"run_dir: {run_dir} cannot be created: {existing} is not a directory"]
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return [f"run_dir: {run_dir} is not writable ({existing}: {err.strerror})"]
    free = shutil.disk_usage(existing).free / 2**30
    if free < min_free_gib:
        return [(f"run_dir: only {free:.2f} GiB free on the disk of {existing}, under"
                f" min_free_gib={min_free_gib:g}")]
    return []


def _looks_local(value: str) -> bool:
    """A hub id looks like 'org/name'; anything else (./x, /x, x/y/z, x) is a local path."""
    if "://" in value:
        return False
    parts = value.split("/")
    return not (len(parts) == 2 and not value.startswith((".", "/")) and not Path(value).exists()
                and not Path(parts[0]).exists())


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """The same config with local relative paths made absolute (workers may run elsewhere)."""

    def fix(value: str | None, always_local: bool = False) -> str | None:
        if value is None or "://" in value or os.path.isabs(value):
            return value
        return os.path.abspath(value) if always_local or _looks_local(value) else value

    cfg = cfg.model_copy(deep=True)
    cfg.run_dir = fix(cfg.run_dir, always_local=True)  # 'runs/demo' is not a hub id
    cfg.model.policy = fix(cfg.model.policy)
    cfg.model.reference = fix(cfg.model.reference)
    cfg.model.tokenizer = fix(cfg.model.tokenizer)
    cfg.data.train = [p if is_dataset_name(p) else fix(p) for p in cfg.data.train]
    cfg.data.eval = [p if is_dataset_name(p) else fix(p) for p in cfg.data.eval]
    cfg.rounds.prompts = [p if is_dataset_name(p) else fix(p) for p in cfg.rounds.prompts]
    cfg.reference.cache_dir = fix(cfg.reference.cache_dir, always_local=True)
    if cfg.reward is not None:
        cfg.reward.model = fix(cfg.reward.model)
    return cfg
