"""Scoring samples: a reward function (`module:function`, e.g. the toy world's gold reward
`pipeline.toy.reward:toy_gold_rewards`), a reward model or a judge, as Ray Data UDFs and the
actors that hold a model for the run.

A prompt or response may be given as a string or as a list of chat messages
(`{"role", "content"}`); a message list is reduced to its last message's content.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Text = str | Sequence[dict[str, Any]]


def message_text(x: Text) -> str:
    """The text of a string, or the content of the last message of a message list."""
    return x if isinstance(x, str) else str(x[-1]["content"])


# -----------------------------------------------------------------------------
# Scorers: Ray Data UDFs that add a `score` column to a table with `prompt_text`, `response`.


def load_reward_fn(spec: str):
    """'package.module:function' → a batched reward fn (prompts, responses) -> scores."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward function {spec!r} cannot be loaded: {err}") from None


class FunctionScorer:
    """Scores with a Python callable named 'module:function'."""

    def __init__(self, spec: str):
        self.fn = load_reward_fn(spec)

    def __call__(self, batch):
        import pyarrow as pa

        scores = self.fn(batch.column("prompt_text").to_pylist(), batch.column("response").to_pylist())
        return batch.append_column("score", pa.array([float(s) for s in scores], pa.float64()))


class _ResidentScorer:
    """A scorer that is a Ray actor for the whole run (pipeline.scorers): `ready` answers
    once it is built, `score` is its call."""

    def ready(self) -> bool:
        return True

    def score(self, batch):
        return self(batch)


class RewardModelScorer(_ResidentScorer):
    """Scores with a HF sequence-classification reward model (one logit per sequence), on
    the whole conversation (`prompt_messages`: system and earlier turns too) and the
    response in the reward model's own chat template when its tokenizer has one. A text
    longer than max_length (or the model's positions) loses its oldest tokens: the response
    and the latest turns are what is scored."""

    def __init__(self, model_path: str, trust_remote_code: bool = False, max_length: int = 2048):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, trust_remote_code=trust_remote_code, use_safetensors=True).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model_path}: a reward model needs num_labels=1,"
                             f" got {self.model.config.num_labels}")
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.truncation_side = "left"
        self.model.config.pad_token_id = self.tok.pad_token_id
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, positions) if positions else max_length

    def texts(self, conversations: list[list[dict[str, str]]], responses: list[str]) -> list[str]:
        if getattr(self.tok, "chat_template", None):
            return [self.tok.apply_chat_template([*c, {"role": "assistant", "content": r}],
                                                 tokenize=False)
                    for c, r in zip(conversations, responses)]
        return ["\n\n".join(m["content"] for m in c) + r for c, r in zip(conversations, responses)]

    def __call__(self, batch):
        import json

        import pyarrow as pa

        names = batch.column_names
        messages = batch.column("prompt_messages").to_pylist() if "prompt_messages" in names \
            else [None] * batch.num_rows
        conversations = [json.loads(m) if m else [{"role": "user", "content": p}]
                         for m, p in zip(messages, batch.column("prompt_text").to_pylist())]
        texts = self.texts(conversations, batch.column("response").to_pylist())
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True,
                       max_length=self.max_length, add_special_tokens=False).to(self.device)
        with self.torch.no_grad():
            scores = self.model(**enc).logits[:, 0].float().cpu().tolist()
        return batch.append_column("score", pa.array(scores, pa.float64()))


JUDGE_TEMPLATE = ("Question:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
                  "Which response answers the question better? Answer with A or B.")


class JudgeScorer(_ResidentScorer):
    """Pairwise judge on a vLLM engine, for one prompt's samples at a time (`map_groups`).

    Each sample is compared with the prompt's first sample (the anchor) in both orders; the
    judge's preference is read exactly from the log-probs of the answer tokens "A" and "B"
    after the judge prompt. score_i = ½[P(i ≻ anchor | i shown as A) + P(i ≻ anchor | i as B)],
    so position bias cancels and the anchor scores 0.5.
    """

    def __init__(self, model_path: str, engine: dict[str, Any], trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        from workers.vllm_pool import Engine

        self.tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.answer_ids = []
        for letter in ("A", "B"):
            ids = self.tok(letter, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"{model_path}: judge answer {letter!r} is not a single token")
            self.answer_ids.append(ids)
        self.engine = Engine(model_path, engine, trust_remote_code)

    def _prompt_ids(self, prompt: str, a: str, b: str) -> list[int]:
        text = JUDGE_TEMPLATE.format(prompt=prompt, a=a, b=b)
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True, tokenize=False)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prefer_first(self, prompt: str, pairs: list[tuple[str, str]]) -> list[float]:
        """P(judge answers A) for each (A, B) pair."""
        import math

        ids = [self._prompt_ids(prompt, a, b) for a, b in pairs]
        logp_a, logp_b = (self.engine.sequence_logprobs(ids, [answer] * len(ids))
                          for answer in self.answer_ids)
        return [1.0 / (1.0 + math.exp(lb[0] - la[0])) for la, lb in zip(logp_a, logp_b)]

    def __call__(self, group):
        import pyarrow as pa

        prompt = group.column("prompt_text")[0].as_py()
        responses = group.column("response").to_pylist()
        anchor = responses[0]
        others = responses[1:]
        as_a = self.prefer_first(prompt, [(r, anchor) for r in others])
        as_b = self.prefer_first(prompt, [(anchor, r) for r in others])
        scores = [0.5] + [0.5 * (pa_ + (1.0 - pb)) for pa_, pb in zip(as_a, as_b)]
        return group.append_column("score", pa.array(scores, pa.float64()))
