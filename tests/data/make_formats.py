"""Writes the tiny input files under tests/data/formats/ (committed; run again after a change).

Every *format* file holds the same three preference pairs in one input shape; the *bad*
files hold one row per way a row can fail, with the reason expected in column ``expect``
(under ``requires_scores=True``, ``truncation: drop``, ``max_prompt_tokens: 48``).

    .venv/bin/python tests/data/make_formats.py [OUT_DIR]
"""

from __future__ import annotations

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


def format_rows() -> dict[str, list[dict[str, Any]]]:
    """The same pairs in every supported input shape."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in (
        "strings", "scored", "trl_chat", "trl_implicit", "ultrafeedback", "messages",
        "custom_fields")}
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
    return out


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
    return written


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(p)
