"""Input formats and bad rows from the committed files in tests/data/formats/, no Ray:
the prepare stage's unit of work (`PrepareUnit`) runs here in-process."""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from pipeline.config import ConfigError, DataConfig, FieldMap, LossConfig
from pipeline.data import loss_requires_scores, normalize_row, tokenize_pair
from pipeline.stages.prepare import (
    report_tables,
    row_group_units,
    run_prepare,
    table_rows,
)

DATA = Path(__file__).resolve().parents[1] / "data"
FORMATS = DATA / "formats"
spec = importlib.util.spec_from_file_location("make_formats", DATA / "make_formats.py")
make_formats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_formats)
GOOD = ["strings", "scored", "trl_chat", "trl_implicit", "ultrafeedback", "messages",
        "custom_fields"]


def data_cfg(name: str = "", **kw) -> DataConfig:
    return DataConfig(train=["x"], fields=FieldMap(**make_formats.FIELDS.get(name, {})), **kw)


def test_committed_files_match_the_generator(tmp_path):
    for path in make_formats.write_all(tmp_path):
        got, want = (pq.read_table(p) for p in (path, FORMATS / path.name))
        assert got.schema == want.schema, path.name
        assert repr(table_rows(got)) == repr(table_rows(want)), path.name  # nan == nan here


@pytest.mark.parametrize("name", GOOD)
def test_each_format_gives_the_same_pairs(name, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = data_cfg(name, chat_template="always")
    rows = table_rows(pq.read_table(FORMATS / f"{name}.parquet"))
    pairs = [normalize_row(r, cfg) for r in rows]
    for pair, (p, c, r) in zip(pairs, make_formats.PAIRS, strict=True):
        prompt = pair.prompt if isinstance(pair.prompt, str) else pair.prompt[-1]["content"]
        assert (prompt, pair.chosen, pair.rejected) == (p, c, r)
    has_scores = name in ("scored", "ultrafeedback", "custom_fields")
    scores = [(p.chosen_score, p.rejected_score) for p in pairs]
    if has_scores:
        assert scores == make_formats.SCORES and all(p.id for p in pairs)
    # every shape tokenises exactly like the plain-string rows under chat_template: always
    base = [normalize_row(r, data_cfg(chat_template="always")) for r in
            table_rows(pq.read_table(FORMATS / "strings.parquet"))]
    for pair, ref in zip(pairs, base):
        got, want = (tokenize_pair(x, tok, cfg) for x in (pair, ref))
        assert [got[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")] == \
               [want[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]


@pytest.mark.parametrize("name", ["bad_strings", "bad_chat", "wrong_types"])
def test_bad_rows_exact_reasons(name, tok_dir, tmp_path, run_unit):
    path = str(FORMATS / f"{name}.parquet")
    expect = pq.read_table(path, columns=["expect"]).column("expect").to_pylist()
    cfg = data_cfg(truncation="drop", max_prompt_tokens=48, chat_template="always")
    quarantined, pairs, _ = run_unit(tok_dir, path, cfg, True, tmp_path / "out")
    assert [(q["source_row"], q["reason"]) for q in quarantined] == \
           [(i, e) for i, e in enumerate(expect) if e != "ok"]
    assert [p["source_row"] for p in pairs] == [i for i, e in enumerate(expect) if e == "ok"]
    assert all(q["source_file"] == path and q["detail"] and q["row_json"] for q in quarantined)


def test_scores_required_only_when_the_loss_needs_them(tok_dir, tmp_path, run_unit):
    assert loss_requires_scores(LossConfig(name="principled", params={"target": "scores"}))
    assert not loss_requires_scores(LossConfig(name="principled", params={"target": "auto"}))
    assert not loss_requires_scores(LossConfig(name="sigmoid"))
    path = str(FORMATS / "bad_strings.parquet")
    cfg = data_cfg(truncation="keep_end", max_prompt_tokens=48, chat_template="always")
    quarantined, pairs, _ = run_unit(tok_dir, path, cfg, False, tmp_path / "out")
    reasons = collections.Counter(q["reason"] for q in quarantined)
    assert "missing_score" not in reasons and "over_length" not in reasons
    assert sum(reasons.values()) == 13 - 3 - 2  # 3 good rows, + missing score, + truncated
    truncated = collections.Counter(p["truncated"] for p in pairs)
    assert truncated == {"none": 4, "prompt": 1}
    kept = next(p for p in pairs if p["truncated"] == "prompt")
    assert len(kept["prompt_ids"]) == 48


def test_field_mapping_and_file_uri(tok_dir, tmp_path, run_unit):
    path = (FORMATS / "custom_fields.parquet").as_uri()
    assert path.startswith("file://")
    quarantined, pairs, _ = run_unit(tok_dir, path, data_cfg("custom_fields"), True,
                                     tmp_path / "out")
    assert not quarantined and [p["id"] for p in pairs] == ["c0", "c1", "c2"]
    assert all(p["source_file"] == path for p in pairs)
    # without the mapping the same file has no prompt/chosen columns
    quarantined, _, _ = run_unit(tok_dir, path, data_cfg(), False, tmp_path / "out2")
    assert [q["reason"] for q in quarantined] == ["missing_field"] * 3


def test_units_split_row_groups_and_keep_row_indices():
    units = row_group_units([str(FORMATS / "bad_strings.parquet")], rows_per_part=3)
    # 13 rows in row groups of 4: [4, 4, 4, 1] → slices of ≤ 3
    assert [(u["row_group"], u["start"], u["length"], u["first_row"]) for u in units] == [
        (0, 0, 3, 0), (0, 3, 1, 3), (1, 0, 3, 4), (1, 3, 1, 7), (2, 0, 3, 8), (2, 3, 1, 11),
        (3, 0, 1, 12)]
    assert [u["part"] for u in units] == list(range(7))


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ConfigError, match="broken.parquet: cannot read as parquet"):
        row_group_units([str(bad)])
    with pytest.raises(ConfigError, match="missing.parquet: cannot read as parquet"):
        row_group_units([(tmp_path / "missing.parquet").as_uri()])
    with pytest.raises(ConfigError, match="directory holds no .parquet"):
        (tmp_path / "empty").mkdir()
        run_prepare([(tmp_path / "empty").as_uri()], "unused", DataConfig(train=["x"]),
                    tmp_path / "o", False)


def test_report_tables_list_reasons_and_lengths():
    stats = {"rows_in": 10, "pairs": 7, "parts": 2, "quarantine_reasons": {"over_length": 2,
             "missing_field": 1}, "truncated": {"none": 6, "response": 1},
             "lengths": {"prompt": {"p50": 12.0, "p95": 30.0, "max": 31.0}}}
    console = Console(record=True, width=100)
    console.print(*report_tables(stats))
    text = console.export_text()
    for needle in ("quarantined: over_length", "20.0%", "kept, truncated: response", "p95",
                   "30"):
        assert needle in text
