"""Study data: toy-world pairs and prompts tokenised as the pipeline does, plus reference
log-probs from the frozen initial model (fp32 HF forward, the same `ResponseLogps` path the
trainer uses).

A "row" is one prepared pair, a dict in the pipeline's prepared-pair schema (`prompt_ids`,
`chosen_ids`, `rejected_ids`, `chosen_score`, `rejected_score`, ...) with, once the reference
has been added, `ref_chosen_logp` and `ref_rejected_logp`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq
import torch

from pipeline.config import PrepareConfig
from pipeline.data import normalize_row, render_prompt, tokenize_pair
from workers.train_step import policy_pair_logps, rows_to_pairs

Row = dict[str, Any]


def data_config(max_prompt_tokens: int = 64, max_response_tokens: int = 64) -> PrepareConfig:
    """The demo's data settings: toy prompts are plain strings rendered as a ChatML user turn."""
    return PrepareConfig(chat_template="always", max_prompt_tokens=max_prompt_tokens,
                      max_response_tokens=max_response_tokens, truncation="keep_end")


def tokenize_rows(raw: Sequence[Row], tokenizer: Any, cfg: PrepareConfig) -> list[Row]:
    """Input rows (prompt/chosen/rejected/scores) → prepared pairs, via the prepare stage's
    own `normalize_row` + `tokenize_pair`; keeps the toy's `label_flipped` flag."""
    out = []
    for row in raw:
        pair = tokenize_pair(normalize_row(row, cfg), tokenizer, cfg)
        pair["label_flipped"] = bool(row.get("label_flipped", False))
        out.append(pair)
    return out


def load_pairs(path: str, tokenizer: Any, cfg: PrepareConfig, limit: int | None = None) -> list[Row]:
    raw = pq.read_table(path).to_pylist()
    return tokenize_rows(raw[:limit] if limit else raw, tokenizer, cfg)


def prompt_rows(texts: Sequence[str], tokenizer: Any, cfg: PrepareConfig) -> list[Row]:
    """Prompts as the sample stage builds them: {prompt_id, prompt_text, prompt_ids}."""
    rows = []
    for i, text in enumerate(texts):
        ids = tokenizer(render_prompt(text, tokenizer, cfg), add_special_tokens=False)["input_ids"]
        rows.append({"prompt_id": f"p{i}", "prompt_text": text,
                     "prompt_ids": ids[-cfg.max_prompt_tokens:]})
    return rows


def unique_prompts(rows: Sequence[Row]) -> list[str]:
    """Prompt texts in order of first appearance (the sample stage's pool from train pairs)."""
    return list(dict.fromkeys(r["prompt_text"] for r in rows))


def columns(rows: Sequence[Row]) -> dict[str, list[Any]]:
    """Rows → a dict of columns, the shape `workers.train_step.rows_to_pairs` reads."""
    return {key: [r[key] for r in rows] for key in rows[0]}


@torch.no_grad()
def add_reference(rows: Sequence[Row], reference: torch.nn.Module, pad_id: int,
                  batch_size: int = 64) -> list[Row]:
    """Copies of `rows` with `ref_chosen_logp` / `ref_rejected_logp`: summed response log-probs
    under `reference` (a `ResponseLogps`), computed once."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        logps = policy_pair_logps(reference, rows_to_pairs(columns(chunk), pad_id))
        for row, c, r in zip(chunk, logps.policy_chosen.tolist(), logps.policy_rejected.tolist()):
            out.append({**row, "ref_chosen_logp": c, "ref_rejected_logp": r})
    return out
