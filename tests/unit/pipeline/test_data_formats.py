"""Input formats and bad rows from the committed files in tests/data/formats/, no Ray:
the prepare stage's unit of work (`PrepareUnit`) runs here in-process."""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from pipeline.config import ConfigError, FieldMap, LossConfig, PrepareConfig
from pipeline.data import loss_requires_scores, normalize_row, tokenize_pair
from pipeline.preflight import expand_paths
from pipeline.stages.prepare import (
    arrow_table,
    file_rows,
    input_file,
    report_tables,
    row_group_units,
    run_prepare,
    table_rows,
)

DATA = Path(__file__).resolve().parents[2] / "data"
FORMATS = DATA / "formats"
spec = importlib.util.spec_from_file_location("make_formats", DATA / "make_formats.py")
make_formats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_formats)
GOOD = ["strings", "scored", "trl_chat", "trl_implicit", "ultrafeedback", "messages",
        "custom_fields", "sharegpt"]
# every format file: parquet ones by shape name, the others by file name
GOOD_FILES = [f"{name}.parquet" for name in GOOD] + list(make_formats.FILES)


def data_cfg(name: str = "", **kw) -> PrepareConfig:
    return PrepareConfig(fields=FieldMap(**make_formats.FIELDS.get(name, {})), **kw)


def _saved_table(path: Path) -> pa.Table:
    shards = expand_paths([str(path)], "t")
    tables = []
    for shard in shards:
        with input_file(shard, "arrow") as f:
            tables.append(arrow_table(f))
    return pa.concat_tables(tables)


def test_committed_files_match_the_generator(tmp_path):
    for path in make_formats.write_all(tmp_path):
        committed = FORMATS / path.name
        if path.suffix == ".parquet":
            got, want = (pq.read_table(p) for p in (path, committed))
        elif path.is_dir():  # save_to_disk: state.json holds a random fingerprint
            got, want = (_saved_table(p) for p in (path, committed))
        else:
            assert path.read_bytes() == committed.read_bytes(), path.name
            continue
        assert got.schema == want.schema, path.name
        assert repr(table_rows(got)) == repr(table_rows(want)), path.name  # nan == nan here


def _rows(path: Path) -> list[dict]:
    return [row for p in expand_paths([str(path)], "t") for _, row in file_rows(p)]


@pytest.mark.parametrize("file", GOOD_FILES)
def test_each_format_gives_the_same_pairs(file, tok_dir):
    from transformers import AutoTokenizer

    name = make_formats.FILES.get(file, file.removesuffix(".parquet"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = data_cfg(name, chat_template="always")
    pairs = [normalize_row(r, cfg) for r in _rows(FORMATS / file)]
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
        run_prepare([(tmp_path / "empty").as_uri()], "unused", PrepareConfig(),
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


@pytest.mark.parametrize("name", sorted(make_formats.BAD_JSON))
def test_bad_json_rows_exact_reasons(name, tok_dir, tmp_path, run_unit):
    path = str(FORMATS / name)
    cfg = data_cfg(truncation="drop", max_prompt_tokens=48, chat_template="always")
    quarantined, pairs, _ = run_unit(tok_dir, path, cfg, False, tmp_path / "out")
    expect = make_formats.BAD_JSON[name]
    assert [(q["source_row"], q["reason"]) for q in quarantined] == expect
    bad_rows = {i for i, _ in expect}
    n_rows = len(make_formats.bad_sharegpt_rows() if name.endswith(".json")
                 else make_formats.bad_lines())
    blank = {1} if name.endswith(".jsonl") else set()  # line 1 is blank: not a row
    assert [p["source_row"] for p in pairs] == sorted(set(range(n_rows)) - bad_rows - blank)
    assert all(q["source_file"] == path and q["detail"] and q["row_json"] for q in quarantined)


def test_sharegpt_errors_name_the_field(tok_dir, tmp_path, run_unit):
    path = str(FORMATS / "bad_sharegpt.json")
    quarantined, _, _ = run_unit(tok_dir, path, data_cfg(chat_template="always"), False,
                                 tmp_path / "out")
    detail = {q["source_row"]: q["detail"] for q in quarantined}
    assert detail[2] == "conversations[0].from: unknown ShareGPT role 'wizard' (expected one of" \
                        " human, gpt, system)"
    assert detail[3] == "conversations[0]: expected {'from': str, 'value': str}"
    assert detail[5] == "conversations: the prompt must end with a user turn"
    assert detail[7] == "chosen: the last message must be the assistant's"
    assert detail[11].startswith("conversations[0].value: control character U+001B at offset 9")
    assert detail[13] == "row: expected a JSON object, got str"
    lines = run_unit(tok_dir, str(FORMATS / "bad_lines.jsonl"), data_cfg(), False,
                     tmp_path / "out2")[0]
    assert [q["detail"].split(":")[0] for q in lines] == ["line 3", "line 4", "line 5",
                                                          "rejected is missing or null"]


def test_sharegpt_system_turn_and_roles(tok_dir):
    from transformers import AutoTokenizer

    cfg = data_cfg(chat_template="always")
    row = {"conversations": [{"from": "system", "value": "Be brief."}, *make_formats.human("q?"),
                             make_formats.gpt("a."), *make_formats.human("and?")],
           "chosen": make_formats.gpt("yes."), "rejected": make_formats.gpt("no.")}
    pair = normalize_row(row, cfg)
    assert [m["role"] for m in pair.prompt] == ["system", "user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == ("yes.", "no.")
    # the same conversation in role/content messages tokenises identically
    chat = {"messages": [{"role": r, "content": m["content"]} for r, m in
                         zip(("system", "user", "assistant", "user"), pair.prompt)],
            "chosen": [{"role": "assistant", "content": "yes."}], "rejected": "no."}
    tok = AutoTokenizer.from_pretrained(tok_dir)
    a, b = (tokenize_pair(normalize_row(r, cfg), tok, cfg) for r in (row, chat))
    assert a == b


def test_json_lines_units_split_by_lines():
    path = str(FORMATS / "bad_lines.jsonl")
    units = row_group_units([path], rows_per_part=3)
    # 8 lines → lines 0-2, 3-5, 6-7, whole lines, byte ranges covering the file
    assert [(u["format"], u["first_row"]) for u in units] == [("jsonl", 0), ("jsonl", 3),
                                                               ("jsonl", 6)]
    assert [u["start"] for u in units[1:]] == [a["start"] + a["length"] for a in units[:-1]]
    assert units[-1]["start"] + units[-1]["length"] == (FORMATS / "bad_lines.jsonl").stat().st_size
    assert [i for i, _ in file_rows(str(FORMATS / "scored.jsonl"))] == [0, 1, 2]
    assert [u["format"] for u in row_group_units([str(FORMATS / "sharegpt.json")])] == ["json"]


def test_broken_json_file_is_named(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"prompt": "x",')
    with pytest.raises(ConfigError, match="broken.json: not valid JSON: .* line 1 column"):
        file_rows(str(bad))
    obj = tmp_path / "obj.json"
    obj.write_text('  [{"a": 1}] ')
    assert file_rows(str(obj)) == [(0, {"a": 1})]
    obj.write_text('"just text"')
    with pytest.raises(ConfigError, match="obj.json: row 0: wrong_type: line 1: expected a JSON"
                                          " object, got str"):
        file_rows(str(obj))  # not an array: read as JSON Lines, whose one line is no object


# --- data.train / data.eval paths: save_to_disk directories and cached dataset names -------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A temporary HF datasets cache holding the ShareGPT rows as 'rayalign/tiny-prefs'."""
    cache = tmp_path / "hf-cache"
    make_formats.cache_dataset(make_formats.format_rows()["sharegpt"], "rayalign/tiny-prefs",
                               cache, splits=("train", "test"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_dataset_names_resolve_from_the_local_cache(hf_cache, tok_dir, tmp_path, run_unit):
    train = expand_paths(["rayalign/tiny-prefs"], "data.train")
    test = expand_paths(["rayalign/tiny-prefs:test"], "data.eval")
    assert [Path(p).name for p in train + test] == ["tiny-prefs-train.arrow",
                                                     "tiny-prefs-test.arrow"]
    assert all(Path(p).is_relative_to(hf_cache) for p in train + test)
    quarantined, pairs, _ = run_unit(tok_dir, train[0], data_cfg(chat_template="always"), False,
                                     tmp_path / "out")
    assert not quarantined and [(p["source_file"], p["source_row"]) for p in pairs] == \
           [(train[0], i) for i in range(3)]
    with pytest.raises(ConfigError, match="data.eval: the cached dataset 'rayalign/tiny-prefs'"
                                          " has no split 'validation' .splits: train, test"):
        expand_paths(["rayalign/tiny-prefs:validation"], "data.eval")


def test_missing_paths_and_names_are_refused(hf_cache, tmp_path):
    with pytest.raises(ConfigError, match="data.train: 'rayalign/nope' is neither a path nor a"
                                          " dataset in the local HF datasets cache"):
        expand_paths(["rayalign/nope"], "data.train")
    with pytest.raises(ConfigError, match="neither a path nor a dataset"):
        expand_paths(["data/train"], "data.train")  # a typo'd directory reads the same
    with pytest.raises(ConfigError, match="data.train: no file matches 'data/train.jsonl'"):
        expand_paths(["data/train.jsonl"], "data.train")
    with pytest.raises(ConfigError, match="no file matches 'data/"):
        expand_paths(["data/*.json"], "data.train")


def test_save_to_disk_directories(tmp_path):
    import datasets

    saved = FORMATS / "trl_implicit_saved"
    assert expand_paths([str(saved)], "data.train") == [str(saved / "data-00000-of-00001.arrow")]
    d = datasets.Dataset.from_list(make_formats.format_rows()["strings"])
    datasets.DatasetDict(train=d, test=d).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match="DatasetDict saved with save_to_disk .splits: train,"
                                          " test.; name one split's directory, e.g. .*dd/train"):
        expand_paths([str(tmp_path / "dd")], "data.train")
    assert len(expand_paths([str(tmp_path / "dd" / "test")], "data.eval")) == 1


def test_check_paths_accepts_saved_directories_and_cached_names(hf_cache, tmp_path):
    from pipeline.config import parse_config
    from pipeline.preflight import check_paths, with_absolute_paths

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    raw = {"model": {"policy": str(tmp_path / "m")}, "run_dir": str(tmp_path / "run"),
           "data": {"train": ["rayalign/tiny-prefs", str(FORMATS / "trl_implicit_saved")],
                    "eval": ["rayalign/tiny-prefs:test"]}}
    cfg = with_absolute_paths(parse_config(raw))
    assert cfg.data.train[0] == "rayalign/tiny-prefs" and cfg.data.eval == raw["data"]["eval"]
    assert check_paths(cfg) == []
    raw["data"]["eval"] = ["rayalign/tiny-prefs:dev", "tiny_prefs_typo"]
    problems = check_paths(parse_config(raw))
    assert problems == [("data.eval: the cached dataset 'rayalign/tiny-prefs' has no split 'dev'"
                         " (splits: train, test); write rayalign/tiny-prefs:SPLIT")]
    raw["data"]["eval"] = ["tiny_prefs_typo"]
    assert with_absolute_paths(parse_config(raw)).data.eval == ["tiny_prefs_typo"]
    assert check_paths(parse_config(raw)) == [
        ("data.eval: 'tiny_prefs_typo' is neither a path nor a dataset in the local HF datasets"
         f" cache ({hf_cache})")]
