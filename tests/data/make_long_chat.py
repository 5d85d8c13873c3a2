"""Long multi-turn preference data shaped like real chat datasets (not the toy world's ~50-token pairs).

TRL's conversational layout: ``prompt`` is a message list (a system turn, then up to nine
earlier user/assistant turns, then the user's question), ``chosen``/``rejected`` are one
assistant message each of 1-5k characters, so most pairs run far over any sensible
``max_prompt_tokens``/``max_response_tokens`` and are truncated; a third of the responses
are short. The last user turn is a toy
task prompt ("List three fruits.") so that the toy gold reward can score samples of an
online round; everything else is English-like prose, lists, code and numbers with the
punctuation, newlines and non-ASCII letters real text has. Lengths vary widely between rows,
so consecutive micro-batches (and the ranks' slices of one) differ in tokens, LM-head
chunks and packed rows.

    .venv/bin/python tests/data/make_long_chat.py OUT.parquet [N_PAIRS] [SEED]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = """the a of to and in is it that for on with as was be by this are or from at an not
have has had but which they you we their one all would there what so up out if about who
get make go know take see come think look want give use find tell ask work seem feel try
leave call model data training reward policy gradient batch token sequence attention layer
loss value result paper method approach experiment baseline metric sample response prompt
user system question answer example function variable memory cache server request error
log file table query index network cluster node worker engine process thread queue time
day week year number point part case group problem fact hand place way world life house
important different large small long short early late high low good bad new old great
little own other right left best better simple clear possible likely recent strong weak
café naïve résumé über façade""".split()  # noqa: SIM905 (a word list reads best as text)
SYSTEM = ["You are a helpful, honest and harmless assistant.",
          "You are an expert software engineer. Answer precisely and show code when useful.",
          "You are a careful research assistant. Cite your assumptions; keep answers short.",
          "Tu es un assistant serviable. Réponds en anglais sauf si on te demande autre chose."]
TASKS = ["List three fruits.", "Can you list 4 birds?", "Name two metals, but not gold.",
         "List five colors.", "Name three tools, but not hammer.", "Can you list 2 sports?"]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 22))]
    if rng.random() < 0.15:
        words.insert(rng.randrange(len(words)), str(rng.randint(2, 2048)))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "?", "!", ":"])


def _block(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:  # a bulleted list
        return "\n".join(f"- {_sentence(rng)}" for _ in range(rng.randint(2, 6)))
    if kind < 0.25:  # a code block
        name = rng.choice(["batch", "step", "loss", "cache"])
        body = "\n".join(f"    {name}_{i} = {name}_{i - 1} * {rng.randint(2, 9)}  # {rng.choice(WORDS)}"
                         for i in range(1, rng.randint(3, 9)))
        return f"```python\ndef {name}_fn({name}_0):\n{body}\n    return {name}_1\n```"
    return " ".join(_sentence(rng) for _ in range(rng.randint(2, 7)))


def prose(rng: random.Random, min_chars: int, max_chars: int) -> str:
    """Paragraphs, lists and code until a length drawn uniformly from [min_chars, max_chars]."""
    target, parts = rng.randint(min_chars, max_chars), []
    while sum(len(p) + 2 for p in parts) < target:
        parts.append(_block(rng))
    return "\n\n".join(parts)[:target].rstrip() + "."


def long_chat_rows(n_pairs: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n_pairs):
        prompt = [{"role": "system", "content": rng.choice(SYSTEM)}]
        for _ in range(rng.randint(0, 4)):  # 0-4 earlier exchanges: up to 9 turns before the question
            prompt.append({"role": "user", "content": prose(rng, 40, 600)})
            prompt.append({"role": "assistant", "content": prose(rng, 200, 2500)})
        prompt.append({"role": "user", "content": rng.choice(TASKS)})
        # mostly 1-5k characters (far over the limits), a third shorter, so that the response
        # tokens of a micro-batch vary from a few dozen to the limit
        chosen, rejected = (prose(rng, 1000, 5000) if rng.random() < 0.65 else prose(rng, 30, 600)
                            for _ in range(2))
        rows.append({"id": f"long-{seed}-{i:05d}", "prompt": prompt,
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def write_long_chat(path: str | Path, n_pairs: int = 300, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(long_chat_rows(n_pairs, seed)), path)
    return path


if __name__ == "__main__":
    out = write_long_chat(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
    print(f"wrote {out}")
