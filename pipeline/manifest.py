"""Stage manifests and content keys: what makes a finished stage skippable.

A stage writes into `<stage>.tmp/`, puts `manifest.json` there last, then renames the
directory into place. A directory without a manifest, or with a manifest whose key does
not match the stage's current inputs, is never taken as done.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """Content digest of a local file. Memoised on the file's identity (device, inode, size,
    modification time in ns): every online round keys its stages on the reference, the
    tokenizer and the reward model, and hashing a 7B model's 15 GB again each round would
    cost tens of seconds a round; a file written again gets a new modification time."""
    st = os.stat(path)
    return _content_digest(os.path.realpath(path), st.st_dev, st.st_ino, st.st_size,
                           st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _content_digest(path: str, dev: int, ino: int, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def files_digest(paths: Iterable[str | os.PathLike[str]]) -> str:
    """Content digest of local files (by name and bytes); remote URIs by their name only."""
    parts = []
    for p in sorted(str(x) for x in paths):
        parts.append((p, file_digest(p) if "://" not in p else "remote"))
    return stable_hash(parts)


def model_digest(model_dir: str) -> str:
    """Digest of the files that define a model or tokenizer (weights, config, tokenizer, template)."""
    root = Path(model_dir)
    if not root.is_dir():
        return stable_hash(["hub", model_dir])
    wanted = [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")
              and p.suffix in {".safetensors", ".json", ".jinja", ".model", ".txt", ".bin"}]
    return stable_hash([(p.name, file_digest(p)) for p in wanted])


@dataclass
class Manifest:
    stage: str
    key: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    seconds: float
    finished_at: float

    @classmethod
    def read(cls, stage_dir: Path) -> Manifest | None:
        path = stage_dir / MANIFEST
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def finished(stage_dir: Path, key: str) -> Manifest | None:
    """The stage's manifest if it finished with this key, else None."""
    m = Manifest.read(stage_dir)
    return m if m is not None and m.key == key else None


def scratch_dir(stage_dir: Path) -> Path:
    """A fresh temp directory beside the stage directory (stale leftovers removed)."""
    tmp = stage_dir.with_name(stage_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, stage_dir: Path, manifest: Manifest) -> None:
    """Write the manifest last, then move the finished stage into place."""
    write_json_atomic(tmp / MANIFEST, manifest.__dict__)
    if stage_dir.exists():
        old = stage_dir.with_name(stage_dir.name + f".old-{time.time_ns()}")
        os.replace(stage_dir, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, stage_dir)
