"""The prepare stage on Ray Data: many files, chat and string rows, exact quarantine."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, PrepareConfig
from pipeline.preflight import expand_paths

pytestmark = pytest.mark.integration


def test_prepare_counts_and_provenance(ray_cluster, toy_world, tmp_path):
    from pipeline.stages.prepare import run_prepare

    good = pq.read_table(toy_world.train_path).slice(0, 10).to_pylist()
    rows = good[:6] + [
        {**good[6], "chosen": None},                      # row 6: missing_field
        {**good[7], "rejected": good[7]["chosen"]},       # row 7: chosen_equals_rejected
        {**good[8], "chosen_score": float("inf")},        # row 8: non_finite_score
        {**good[9], "rejected": "   "},                   # row 9: empty_response
    ]
    a = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), a, row_group_size=3)  # 4 row groups
    b = tmp_path / "b.parquet"
    pq.write_table(pq.read_table(toy_world.train_chat_path).slice(0, 5), b)
    cfg = PrepareConfig(chat_template="always", max_quarantine_fraction=0.5)
    out = tmp_path / "out"
    stats = run_prepare([str(a), str(b)], str(toy_world.model_dir), cfg, out, False)
    assert stats["rows_in"] == 15 and stats["pairs"] == 11 and stats["quarantined"] == 4
    assert stats["quarantine_reasons"] == {"missing_field": 1, "chosen_equals_rejected": 1,
                                           "non_finite_score": 1, "empty_response": 1}
    q = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert [(r["source_file"], r["source_row"]) for r in q] == [(str(a), i) for i in (6, 7, 8, 9)]
    assert all(r["row_json"] and r["detail"] for r in q)
    pairs = pq.read_table(out / "pairs.parquet")
    # the same pair as a string row and as a chat row tokenises identically
    by_file = {}
    for r in pairs.to_pylist():
        by_file.setdefault(r["source_file"], []).append(r)
    for s, c in zip(by_file[str(a)][:5], by_file[str(b)][:5]):
        assert (s["prompt_ids"], s["chosen_ids"], s["rejected_ids"]) == \
               (c["prompt_ids"], c["chosen_ids"], c["rejected_ids"])

    cfg = PrepareConfig(chat_template="always", max_quarantine_fraction=0.1)
    with pytest.raises(ConfigError, match="4 of 10 rows"):
        run_prepare([str(a)], str(toy_world.model_dir), cfg, tmp_path / "out2", False)


def test_corrupt_parquet_is_named(ray_cluster, toy_world, tmp_path):
    from pipeline.stages.prepare import run_prepare

    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ConfigError, match="broken.parquet: cannot read as parquet"):
        run_prepare([str(bad)], str(toy_world.model_dir), PrepareConfig(),
                    tmp_path / "o", False)


FORMATS = Path(__file__).resolve().parents[1] / "data" / "formats"


def test_prepare_globs_uris_and_formats(ray_cluster, toy_world, tmp_path):
    """Every default-named format through Ray Data: glob + file:// URI, identical tokens."""
    from pipeline.stages.prepare import run_prepare

    names = ["strings", "scored", "trl_chat", "trl_implicit", "messages"]
    paths = expand_paths([str(FORMATS / "s[ct]*.parquet"), str(FORMATS / "trl_*.parquet")], "t")
    paths.append((FORMATS / "messages.parquet").as_uri())
    assert sorted(Path(p.removeprefix("file://")).stem for p in paths) == sorted(names)
    cfg = PrepareConfig(chat_template="always", max_quarantine_fraction=0.0)
    stats = run_prepare(paths, str(toy_world.model_dir), cfg, tmp_path / "out", False,
                        rows_per_part=2)
    assert (stats["pairs"], stats["quarantined"], stats["parts"]) == (15, 0, 10)
    pairs = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist()
    assert [(p["source_file"], p["source_row"]) for p in pairs] == \
           [(f, i) for f in paths for i in range(3)]
    tokens = {p["source_file"]: [] for p in pairs}
    for p in pairs:
        tokens[p["source_file"]].append((p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]))
    assert len({repr(v) for v in tokens.values()}) == 1


def test_prepare_new_formats_and_quarantine(ray_cluster, toy_world, tmp_path, monkeypatch):
    """JSON, JSON Lines, ShareGPT (JSON and parquet), a save_to_disk directory and a datasets
    name from the local cache, through Ray Data: the same three pairs as strings.parquet, each
    with its file and row; the bad JSON files' rows quarantined with their exact reasons."""
    import importlib.util

    from pipeline.stages.prepare import run_prepare

    spec = importlib.util.spec_from_file_location("make_formats", FORMATS.parent / "make_formats.py")
    make_formats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_formats)
    cache = tmp_path / "hf-cache"
    make_formats.cache_dataset(make_formats.format_rows()["sharegpt"], "rayalign/tiny-prefs", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    sources = [str(FORMATS / f) for f in ("strings.parquet", "sharegpt.parquet",
                                          *make_formats.FILES)] + ["rayalign/tiny-prefs"]
    paths = expand_paths(sources, "data.train")
    assert len(paths) == len(sources)  # each of these is one file
    cfg = PrepareConfig(chat_template="always", max_quarantine_fraction=0.0)
    stats = run_prepare(paths, str(toy_world.model_dir), cfg, tmp_path / "out", False,
                        rows_per_part=2)
    assert (stats["pairs"], stats["quarantined"]) == (3 * len(paths), 0)
    pairs = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist()
    assert [(p["source_file"], p["source_row"]) for p in pairs] == \
           [(f, i) for f in paths for i in range(3)]
    tokens: dict[str, list] = {}
    for p in pairs:
        tokens.setdefault(p["source_file"], []).append(
            (p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]))
    assert len({repr(v) for v in tokens.values()}) == 1 and len(tokens) == len(paths)

    bad = [str(FORMATS / name) for name in sorted(make_formats.BAD_JSON)]
    cfg = PrepareConfig(chat_template="always", max_quarantine_fraction=1.0)
    stats = run_prepare(bad, str(toy_world.model_dir), cfg, tmp_path / "bad", False,
                        rows_per_part=3)
    q = pq.read_table(tmp_path / "bad" / "quarantine.parquet").to_pylist()
    assert [(r["source_file"], r["source_row"], r["reason"]) for r in q] == \
           [(f, i, reason) for f in bad for i, reason in make_formats.BAD_JSON[Path(f).name]]
    assert all(r["detail"] and r["row_json"] for r in q)
    assert stats["pairs"] == 2 + 3  # bad_lines.jsonl: 3 good lines; bad_sharegpt.json: 2 good rows


def _consume_splits(ds, n: int, epochs: int) -> list[list[list[str]]]:
    """ids seen by each of n consumers per epoch, as Ray Train's get_dataset_shard feeds them."""
    import threading

    splits = ds.streaming_split(n, equal=True)
    seen = [[[] for _ in range(epochs)] for _ in range(n)]

    def consume(i: int) -> None:
        for e in range(epochs):
            for batch in splits[i].iter_batches(batch_size=16, batch_format="numpy"):
                seen[i][e].extend(batch["id"].tolist())

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen


def test_prepared_parts_shard_disjointly(ray_cluster, tmp_path):
    import ray

    from pipeline.stages.prepare import PAIR_SCHEMA

    parts = tmp_path / "pairs.parquet"
    parts.mkdir()
    n_rows = 240
    for k in range(6):  # as prepare writes them: one part per unit
        rows = [{"id": f"r{i}", "prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}
                for i in range(k * 40, (k + 1) * 40)]
        pq.write_table(pa.Table.from_pylist(rows, PAIR_SCHEMA), parts / f"part-{k:06d}.parquet")
    ds = ray.data.read_parquet(str(parts)).random_shuffle(seed=3)
    seen = _consume_splits(ds, n=3, epochs=2)
    for e in range(2):
        shards = [set(seen[w][e]) for w in range(3)]
        assert sum(len(s) for s in shards) == n_rows  # disjoint ...
        assert set().union(*shards) == {f"r{i}" for i in range(n_rows)}  # ... and covering
        assert {len(s) for s in shards} == {n_rows // 3}
    # No order is pinned: which blocks reach which consumer depends on timing, and whether
    # a seeded random_shuffle repeats its order across executions depends on the datasource
    # (V2 did not, V1 does). Training does not rely on either: every worker reads the
    # seeded order whole and takes its slice (pipeline.stages.train.ordered_pairs).


@pytest.mark.slow
def test_prepare_100k_pairs(ray_cluster, toy_world, tmp_path):
    """100k synthetic pairs through prepare; prints rows/s (no timing assert)."""
    import random
    import time

    from pipeline.stages.prepare import run_prepare
    from pipeline.toy.task import render_prompt, sample_response, sample_spec

    rng = random.Random(0)
    paths = []
    for f in range(4):
        rows = []
        for i in range(25_000):
            spec = sample_spec(rng)
            chosen = sample_response(spec, rng)
            rows.append({"id": f"{f}-{i}", "prompt": render_prompt(spec, rng), "chosen": chosen,
                         "rejected": "rock, " * rng.randint(1, 30) + chosen,
                         "chosen_score": 1.0, "rejected_score": 0.1})
        path = tmp_path / f"big-{f}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10_000)
        paths.append(str(path))
    cfg = PrepareConfig(max_prompt_tokens=64, max_response_tokens=32)
    t0 = time.perf_counter()
    stats = run_prepare(paths, str(toy_world.model_dir), cfg, tmp_path / "out", False,
                        requires_scores=True, rows_per_part=8192)
    elapsed = time.perf_counter() - t0
    print(f"prepare: {stats['rows_in']} rows in {elapsed:.1f} s = {stats['rows_in'] / elapsed:.0f}"
          f" rows/s, {stats['parts']} part files")
    assert stats["rows_in"] == 100_000 and stats["pairs"] == 100_000
    assert stats["parts"] == 4 * 5  # 4 files × row groups of 10k, 10k, 5k rows → 2 + 2 + 1 units
    assert len(list((tmp_path / "out" / "pairs.parquet").glob("part-*.parquet"))) == stats["parts"]
    assert stats["truncated"].get("response", 0) > 0


def test_a_score_margin_leaves_inverted_pairs_out_and_keeps_them(ray_cluster, toy_world, tmp_path):
    """data.min_score_margin: 0 trains on the pairs whose chosen score is the higher (the
    toy world flips some labels on purpose): the others are counted and kept, not lost, and
    do not count as quarantined."""
    from pipeline.stages.prepare import run_prepare

    source = pq.read_table(toy_world.train_path).to_pylist()
    inverted = {r["id"] for r in source if not r["chosen_score"] > r["rejected_score"]}
    assert inverted and {r["id"] for r in source if r["label_flipped"]} <= inverted
    cfg = PrepareConfig(chat_template="always", max_quarantine_fraction=0.0)
    stats = run_prepare([str(toy_world.train_path)], str(toy_world.model_dir), cfg,
                        tmp_path / "out", False, min_score_margin=0.0)
    assert (stats["rows_in"], stats["filtered"], stats["quarantined"]) == (
        len(source), len(inverted), 0)
    pairs = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist()
    assert len(pairs) == len(source) - len(inverted)
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    left_out = pq.read_table(tmp_path / "out" / "filtered.parquet").to_pylist()
    assert {r["id"] for r in left_out} == inverted
    assert {r["reason"] for r in left_out} == {"score_margin"}
    assert all(json.loads(r["row_json"])["id"] == r["id"] for r in left_out)
    # without the option: every pair, and no filtered file
    stats = run_prepare([str(toy_world.train_path)], str(toy_world.model_dir), cfg,
                        tmp_path / "all", False)
    assert stats["pairs"] == len(source) and "filtered" not in stats
    assert not (tmp_path / "all" / "filtered.parquet").exists()
