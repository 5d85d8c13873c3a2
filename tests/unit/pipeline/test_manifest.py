"""Stage manifests: written last, a half-written stage is never taken as done."""

from __future__ import annotations

import time

from pipeline.manifest import Manifest, commit, files_digest, finished, scratch_dir, stable_hash


def test_stable_hash_ignores_dict_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_commit_and_skip(tmp_path):
    stage = tmp_path / "round-0" / "prepare"
    assert finished(stage, "k1") is None
    tmp = scratch_dir(stage)
    (tmp / "pairs.parquet").write_text("x")
    assert finished(stage, "k1") is None  # nothing committed yet
    commit(tmp, stage, Manifest("prepare", "k1", {}, {"n": 1}, 0.1, time.time()))
    assert not tmp.exists() and (stage / "pairs.parquet").read_text() == "x"
    assert finished(stage, "k1").outputs == {"n": 1}
    assert finished(stage, "k2") is None  # other inputs: must rerun
    tmp = scratch_dir(stage)  # a rerun replaces the old output whole
    (tmp / "other").write_text("y")
    commit(tmp, stage, Manifest("prepare", "k2", {}, {}, 0.1, time.time()))
    assert not (stage / "pairs.parquet").exists() and finished(stage, "k2") is not None


def test_half_written_stage_is_not_done(tmp_path):
    stage = tmp_path / "train"
    stage.mkdir()
    (stage / "model").mkdir()  # output without a manifest
    assert finished(stage, "k") is None
    (stage / "manifest.json").write_text('{"stage": "train", "key": "k"')  # truncated JSON
    assert finished(stage, "k") is None
    stale = tmp_path / "train.tmp"
    stale.mkdir()
    (stale / "junk").write_text("z")
    fresh = scratch_dir(stage)
    assert fresh == stale and not (fresh / "junk").exists()


def test_files_digest_tracks_content(tmp_path):
    a = tmp_path / "a.parquet"
    a.write_bytes(b"one")
    d1 = files_digest([a])
    a.write_bytes(b"two")
    assert files_digest([a]) != d1


def test_file_digest_hashes_a_file_once_until_it_is_written_again(tmp_path):
    """Rounds key their stages on the same model files again and again: the content is
    hashed once per file identity, and a file written again is hashed again."""
    import os

    from pipeline.manifest import _content_digest, file_digest

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 1000)
    first = file_digest(f)
    misses = _content_digest.cache_info().misses
    assert file_digest(f) == first and _content_digest.cache_info().misses == misses
    f.write_bytes(b"b" * 1000)  # same size, new content
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 1_000_000))
    assert file_digest(f) != first
    f.write_bytes(b"a" * 1000)
    assert file_digest(f) == first  # by content, not by identity
