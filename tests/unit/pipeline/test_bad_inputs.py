"""The bad-input corpus (tests/data/bad/): every adversarial row gets its exact quarantine
reason, every broken file a clear error naming it, and nothing crashes or is lost."""

from __future__ import annotations

import collections

import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, PrepareConfig
from pipeline.stages.prepare import row_group_units, table_rows
from tests.unit.conftest import DATA, load_data_script

make_bad = load_data_script("make_bad")
BAD = DATA / "bad"


def cfg(**kw) -> PrepareConfig:
    return PrepareConfig(truncation="drop", max_prompt_tokens=48,
                      max_response_tokens=64, chat_template="always", **kw)


def test_committed_corpus_matches_the_generator(tmp_path):
    for path in make_bad.write_all(tmp_path):
        committed = BAD / path.relative_to(tmp_path)
        assert path.read_bytes() == committed.read_bytes() or \
            repr(table_rows(pq.read_table(path))) == repr(table_rows(pq.read_table(committed))), \
            f"{committed} is stale: run tests/data/make_bad.py"


@pytest.mark.parametrize("policy, column", [("keep", "expect"), ("strip", "expect"),
                                            ("quarantine", "expect_quarantine")])
@pytest.mark.parametrize("name", ["text", "chat"])
def test_adversarial_rows_get_their_exact_reason(name, policy, column, tok_dir, tmp_path, run_unit):
    path = str(BAD / f"{name}.parquet")
    expect = pq.read_table(path, columns=[column]).column(column).to_pylist()
    quarantined, pairs, _ = run_unit(tok_dir, path, cfg(control_characters=policy), False,
                                     tmp_path / "out")
    assert [(q["source_row"], q["reason"]) for q in quarantined] == \
           [(i, e) for i, e in enumerate(expect) if e != "ok"]
    assert sorted(p["source_row"] for p in pairs) == [i for i, e in enumerate(expect) if e == "ok"]
    assert len(quarantined) + len(pairs) == len(expect)  # nothing lost
    for q in quarantined:
        assert q["source_file"] == path and q["detail"] and q["row_json"]


@pytest.mark.parametrize("name", ["text", "chat"])
def test_soft_controls_are_kept_or_stripped(name, tok_dir, tmp_path, run_unit):
    """keep: the form feeds, vertical tabs, DEL and stray C1 reach the tokens as written;
    strip: none is left (line breaks become newlines), and the same rows are kept."""
    from transformers import AutoTokenizer

    from pipeline.data import _ANY_CONTROL_RE

    tok = AutoTokenizer.from_pretrained(tok_dir)
    path = str(BAD / f"{name}.parquet")
    texts = {}
    for policy in ("keep", "strip"):
        _, pairs, _ = run_unit(tok_dir, path, cfg(control_characters=policy), False,
                               tmp_path / policy)
        texts[policy] = {p["source_row"]: tok.decode(p["prompt_ids"] + p["chosen_ids"]
                                                     + p["rejected_ids"]) for p in pairs}
    assert texts["keep"].keys() == texts["strip"].keys()
    soft = {i for i, t in texts["keep"].items() if _ANY_CONTROL_RE.search(t)}
    expect = pq.read_table(path, columns=["expect", "expect_quarantine"]).to_pylist()
    assert soft == {i for i, r in enumerate(expect)
                    if r["expect"] == "ok" and r["expect_quarantine"] == "control_characters"}
    assert not any(_ANY_CONTROL_RE.search(t) for t in texts["strip"].values())
    for i in soft:
        assert texts["strip"][i] == texts["keep"][i].translate(
            {c: None for c in range(0x7F, 0xA0) if c != 0x85}
            | {c: None for c in (0x07, 0x7F)} | {0x0B: "\n", 0x0C: "\n", 0x85: "\n"})


def test_special_tokens_may_be_allowed(tok_dir, tmp_path, run_unit):
    path = str(BAD / "text.parquet")
    quarantined, _, _ = run_unit(tok_dir, path, cfg(special_tokens_in_text="allow"), False,
                                 tmp_path / "out")
    assert "special_token_in_text" not in {q["reason"] for q in quarantined}


def test_the_injection_really_would_add_a_turn(tok_dir):
    """Why the rows are quarantined: the injected text tokenises to the special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = tok(make_bad.INJECT, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids


@pytest.mark.parametrize("name, expect", [(k, v) for k, v in make_bad.FILE_EXPECT.items()])
def test_broken_files(name, expect, tok_dir, tmp_path, run_unit):
    path = str(BAD / name)
    if isinstance(expect, str):
        with pytest.raises(ConfigError, match=f"{path}: {expect}"):
            row_group_units([path])
        return
    quarantined, pairs, _ = run_unit(tok_dir, path, cfg(), False, tmp_path / "out")
    reasons = collections.Counter(q["reason"] for q in quarantined)
    assert len(pairs) == expect["pairs"]
    assert dict(reasons) == {k: v for k, v in expect.items() if k not in ("pairs", "quarantined")}
    assert len(quarantined) == expect.get("quarantined", len(quarantined))
