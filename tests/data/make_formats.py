"""Writes the tiny input files under tests/data/formats/ (committed; run again after a change).

Every *format* file holds the same three preference pairs in one input shape (parquet, and
JSON / JSON Lines / a `datasets` save_to_disk directory for the newer ones); the *bad*
parquet files hold one row per way a row can fail, with the reason expected in column
``expect`` (under ``requires_scores=True``, ``truncation: drop``, ``max_prompt_tokens: 48``);
the bad JSON files' reasons are in `BAD_JSON` (no scores required).

    .venv/bin/python tests/data/make_formats.py [OUT_DIR]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent / "formats"
PAIRS = [("List two fruits.", "apple, pear.", "rock, pear."),
         ("Name three birds, but not owl.", "Sure: eagle, crow, swan.", "owl."),
         ("Can you list 4 metals?", "iron, gold, tin, zinc.", "iron iron iron.")]
SCORES = [(1.04, 0.25), (1.06, 0.0), (1.08, 0.1)]
# data.fields for the files whose column names differ from the defaults
FIELDS: dict[str, dict[str, str]] = {
    "ultrafeedback": {"chosen_score": "score_chosen", "rejected_score": "score_rejected",
                      "id": "prompt_id"},
    "custom_fields": {"prompt": "question", "chosen": "good", "rejected": "bad",
                      "chosen_score": "good_reward", "rejected_score": "bad_reward", "id": "uid"},
}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def human(text: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": text}]


def gpt(text: str) -> dict[str, str]:
    return {"from": "gpt", "value": text}


def format_rows() -> dict[str, list[dict[str, Any]]]:
    """The same pairs in every supported input shape."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in (
        "strings", "scored", "trl_chat", "trl_implicit", "ultrafeedback", "messages",
        "custom_fields", "sharegpt")}
    for i, ((p, c, r), (sc, sr)) in enumerate(zip(PAIRS, SCORES)):
        out["strings"].append({"prompt": p, "chosen": c, "rejected": r})
        out["scored"].append({"id": f"s{i}", "prompt": p, "chosen": c, "rejected": r,
                              "chosen_score": sc, "rejected_score": sr})
        out["trl_chat"].append({"prompt": user(p), "chosen": assistant(c),
                                "rejected": assistant(r)})
        out["trl_implicit"].append({"chosen": user(p) + assistant(c),
                                    "rejected": user(p) + assistant(r)})
        out["ultrafeedback"].append({"prompt": p, "prompt_id": f"u{i}",
                                     "chosen": user(p) + assistant(c),
                                     "rejected": user(p) + assistant(r),
                                     "score_chosen": sc, "score_rejected": sr})
        out["messages"].append({"messages": user(p), "chosen": c, "rejected": r})
        out["custom_fields"].append({"uid": f"c{i}", "question": p, "good": c, "bad": r,
                                     "good_reward": sc, "bad_reward": sr})
        # LLaMA-Factory's DPO layout (formatting: sharegpt, ranking: true)
        out["sharegpt"].append({"conversations": human(p), "chosen": gpt(c), "rejected": gpt(r)})
    return out


# the non-parquet files: file name → the shape (format_rows key) it holds
FILES = {"scored.jsonl": "scored", "trl_chat.json": "trl_chat", "sharegpt.json": "sharegpt",
         "trl_implicit_saved": "trl_implicit"}


def bad_sharegpt_rows() -> list[Any]:
    """ShareGPT rows (a JSON array), each failing one way; the reason in `expect`."""
    ok = [{"conversations": human(p), "chosen": gpt(c), "rejected": gpt(r), "expect": "ok"}
          for p, c, r in PAIRS[:2]]
    base = ok[0]
    system = {"from": "system", "value": "Be brief."}
    return ok + [
        {**base, "conversations": [{"from": "wizard", "value": "hi"}], "expect": "bad_messages"},
        {**base, "conversations": [{"from": "human"}], "expect": "bad_messages"},
        {**base, "conversations": [], "expect": "bad_messages"},
        {**base, "conversations": human("hi") + [gpt("ok")], "expect": "bad_role_sequence"},
        {**base, "conversations": human("hi") + [system] + human("hi"),
         "expect": "bad_role_sequence"},
        {**base, "chosen": {"from": "human", "value": "apple."}, "expect": "bad_role_sequence"},
        {**base, "chosen": 3, "expect": "wrong_type"},
        {**base, "rejected": None, "expect": "missing_field"},
        {**base, "rejected": base["chosen"], "expect": "chosen_equals_rejected"},
        {**base, "conversations": human("List two \x1b[2Jfruits."), "expect": "control_characters"},
        {**base, "rejected": gpt("  "), "expect": "empty_response"},
        "not a row",
    ]


def bad_lines() -> list[bytes]:
    """JSON Lines: good rows between lines that are not rows (a blank line is skipped)."""
    good = [json.dumps({"prompt": p, "chosen": c, "rejected": r}).encode() for p, c, r in PAIRS]
    return [good[0], b"", b'{"prompt": "List two fruits.", "chosen": ', b"[1, 2]",
            b'{"prompt": "List two fruits.", "chosen": "apple, \xff pear.", "rejected": "x."}',
            good[1], good[2],
            b'{"prompt": "List two fruits.", "chosen": "apple, pear.", "rejected": null}']


# (source_row, reason) of the rows the bad JSON files quarantine; the other rows are pairs
BAD_JSON = {
    "bad_sharegpt.json": [(i, r if isinstance(r, str) else "wrong_type") for i, r in enumerate(
        row["expect"] if isinstance(row, dict) else None for row in bad_sharegpt_rows())
        if r != "ok"],
    "bad_lines.jsonl": [(2, "bad_json"), (3, "wrong_type"), (4, "undecodable_text"),
                        (7, "missing_field")],
}


def bad_string_rows() -> list[dict[str, Any]]:
    ok = [{"prompt": p, "chosen": c, "rejected": r, "chosen_score": s[0], "rejected_score": s[1],
           "expect": "ok"} for (p, c, r), s in zip(PAIRS, SCORES)]
    base = ok[0]
    return ok + [
        {**base, "chosen": None, "expect": "missing_field"},
        {**base, "prompt": None, "expect": "missing_field"},
        {**base, "rejected": "  ", "expect": "empty_response"},
        {**base, "prompt": "\n", "expect": "empty_prompt"},
        {**base, "rejected": base["chosen"], "expect": "chosen_equals_rejected"},
        {**base, "chosen_score": float("inf"), "expect": "non_finite_score"},
        {**base, "rejected_score": float("nan"), "expect": "non_finite_score"},
        {**base, "rejected_score": None, "expect": "missing_score"},
        {**base, "prompt": "List two fruits. " * 40, "expect": "over_length"},
        {**base, "chosen": b"apple, \xff\xfe pear.", "expect": "undecodable_text"},
    ]


def bad_chat_rows() -> list[dict[str, Any]]:
    ok = [{"prompt": user(p), "chosen": assistant(c), "rejected": assistant(r),
           "chosen_score": s[0], "rejected_score": s[1], "expect": "ok"}
          for (p, c, r), s in zip(PAIRS[:2], SCORES)]
    base = ok[0]
    system = [{"role": "system", "content": "Be brief."}]
    return ok + [
        {**base, "prompt": [{"role": "wizard", "content": "hi"}], "expect": "bad_messages"},
        {**base, "prompt": [], "expect": "bad_messages"},
        {**base, "prompt": base["prompt"] + assistant("ok"), "expect": "bad_role_sequence"},
        {**base, "prompt": base["prompt"] + system + base["prompt"], "expect": "bad_role_sequence"},
        {**base, "chosen": user("apple."), "expect": "bad_role_sequence"},
        {**base, "chosen": user("other") + assistant("x."), "expect": "bad_role_sequence"},
        {**base, "rejected": None, "expect": "missing_field"},
        {**base, "rejected": base["chosen"], "expect": "chosen_equals_rejected"},
    ]


def _strings_with_invalid_utf8(rows: list[dict[str, Any]]) -> pa.Table:
    """Text columns typed `string` although one value is not UTF-8, as a buggy writer makes."""
    table = pa.Table.from_pylist(
        [{k: v.encode() if isinstance(v, str) and k != "expect" else v for k, v in r.items()}
         for r in rows])
    columns = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_binary(col.type):
            col = pa.Array.from_buffers(pa.string(), len(col), col.buffers(), col.null_count)
        columns[name] = col
    return pa.table(columns)


def write_all(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    tables = {name: pa.Table.from_pylist(rows) for name, rows in format_rows().items()}
    tables["bad_strings"] = _strings_with_invalid_utf8(bad_string_rows())
    tables["bad_chat"] = pa.Table.from_pylist(bad_chat_rows())
    tables["wrong_types"] = pa.table({"prompt": ["List two fruits."] * 2, "chosen": [1, 2],
                                      "rejected": ["a.", "b."], "expect": ["wrong_type"] * 2})
    written = []
    for name, table in tables.items():
        path = out / f"{name}.parquet"
        pq.write_table(table, path, row_group_size=4)
        written.append(path)
    return written + write_new_formats(out)


def write_new_formats(out: Path) -> list[Path]:
    """JSON arrays, JSON Lines, ShareGPT in parquet, a `datasets` save_to_disk directory."""
    import datasets

    rows = format_rows()
    for name, shape in FILES.items():
        path = out / name
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r) + "\n" for r in rows[shape]))
        elif name.endswith(".json"):
            path.write_text(json.dumps(rows[shape], indent=2) + "\n")
        elif name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows[shape]), path)
        else:
            shutil.rmtree(path, ignore_errors=True)
            datasets.Dataset.from_list(rows[shape]).save_to_disk(str(path))
    (out / "bad_sharegpt.json").write_text(json.dumps(bad_sharegpt_rows(), indent=2) + "\n")
    (out / "bad_lines.jsonl").write_bytes(b"\n".join(bad_lines()) + b"\n")
    return [out / name for name in (*FILES, "bad_sharegpt.json", "bad_lines.jsonl")]


def cache_dataset(rows: list[dict[str, Any]], repo_id: str, cache_dir: Path,
                  splits: tuple[str, ...] = ("train",)) -> Path:
    """Put `rows` into an HF datasets cache as `load_dataset(repo_id)` leaves a Hub dataset
    there (<org>___<name>/default/0.0.0/<hash>/<name>-<split>.arrow + dataset_info.json),
    built by the JSON builder from a file, so tests can load it by name offline."""
    from datasets.packaged_modules.json.json import Json

    org, name = repo_id.split("/")
    src = cache_dir / f"{name}.source.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = Json(data_files={s: str(src) for s in splits}, cache_dir=str(cache_dir),
                   dataset_name=name, hash="0123abcd")
    builder.download_and_prepare()
    built = next((cache_dir / name).glob("default-*"))
    target = cache_dir / f"{org}___{name}" / "default"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(built), target)
    shutil.rmtree(cache_dir / name)
    src.unlink()
    return target


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(p)
