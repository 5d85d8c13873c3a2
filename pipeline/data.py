"""Preference rows: normalisation, validation, chat-template rendering, tokenisation.

Pure functions over one row at a time (no Ray here); the prepare stage maps them over
Ray Data blocks. Accepted input shapes per row:

- strings: ``prompt``, ``chosen``, ``rejected`` plain text;
- chat: ``prompt`` a list of ``{"role", "content"}`` messages, ``chosen``/``rejected`` a list
  holding the assistant turn (TRL conversational), or the whole conversation including
  the prompt turns (UltraFeedback style; the shared prefix becomes the prompt);
- ``messages`` (the prompt turns) with string or message-list completions;
- ShareGPT (LLaMA-Factory's DPO layout): ``conversations`` a list of ``{"from", "value"}``
  turns (``human``/``gpt``/``system``), ``chosen``/``rejected`` one ``{"from": "gpt", ...}``
  message each (a single message dict, ShareGPT or role/content, stands for a one-message list).

Column names come from ``data.fields``; text may be ``string`` or ``binary`` (UTF-8) columns.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import LossConfig, PrepareConfig, loss_needs

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # `from` → role


class BadRow(ValueError):
    """A row that cannot be used; `reason` is a short stable code, `detail` names the field."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


Messages = list[dict[str, str]]


@dataclass
class Pair:
    prompt: str | Messages
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    id: str
    prompt_field: str = "prompt"  # where the prompt turns came from, for error messages
    content_key: str = "content"


def loss_requires_scores(loss: LossConfig) -> bool:
    """Whether every pair needs finite chosen/rejected scores (the loss declares the need in
    workers.losses.LOSS_NEEDS, e.g. ``principled`` with ``target: scores``). Decided on the
    driver, passed to prepare."""
    return "scores" in loss_needs(loss)


def _text(value: Any, field: str) -> Any:
    """UTF-8 bytes (binary columns, or string columns holding invalid UTF-8) → str."""
    if not isinstance(value, (bytes, bytearray)):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRow("undecodable_text", f"{field}: not UTF-8 ({err.reason} at byte {err.start})") \
            from None


def _message(m: Any, where: str) -> dict[str, str]:
    """One ``{role, content}`` or ShareGPT ``{from, value}`` message → ``{role, content}``."""
    sharegpt = isinstance(m, dict) and m.get("from") is not None and m.get("role") is None
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    if isinstance(m, dict):
        m = {k: _text(m.get(k), f"{where}.{k}") for k in (role_key, content_key)}
    if not isinstance(m, dict) or not isinstance(m.get(role_key), str) \
            or not isinstance(m.get(content_key), str):
        raise BadRow("bad_messages", f"{where}: expected {{'{role_key}': str, '{content_key}': str}}")
    role = m[role_key]
    if sharegpt:
        if role not in SHAREGPT_ROLES:
            raise BadRow("bad_messages", f"{where}.from: unknown ShareGPT role {role!r}"
                         f" (expected one of {', '.join(SHAREGPT_ROLES)})")
        role = SHAREGPT_ROLES[role]
    elif role not in ROLES:
        raise BadRow("bad_messages", f"{where}: unknown role {role!r}")
    return {"role": role, "content": m[content_key]}


def _messages(value: Any, field: str) -> Messages:
    if isinstance(value, dict):  # one message (ShareGPT's chosen/rejected)
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRow("bad_messages", f"{field}: expected a non-empty list of messages")
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def _check_prompt_roles(prompt: Messages, field: str) -> None:
    if prompt[-1]["role"] != "user":
        raise BadRow("bad_role_sequence", f"{field}: the prompt must end with a user turn")
    if any(m["role"] == "system" for m in prompt[1:]):
        raise BadRow("bad_role_sequence", f"{field}: a system message may only come first")


def _response(value: Any, prompt: Messages | None, field: str) -> tuple[str, Messages | None]:
    """Response text, and the prompt turns found in a whole-conversation value (if any)."""
    if isinstance(value, str):
        return value, None
    msgs = _messages(value, field)
    if msgs[-1]["role"] != "assistant":
        raise BadRow("bad_role_sequence", f"{field}: the last message must be the assistant's")
    head = msgs[:-1]
    if head and prompt is not None and head != prompt:
        raise BadRow("bad_role_sequence", f"{field}: conversation does not start with the prompt")
    if any(m["role"] == "assistant" and i == len(head) - 1 for i, m in enumerate(head)):
        raise BadRow("bad_role_sequence", f"{field}: two assistant turns in a row")
    return msgs[-1]["content"], head or None


# Control characters. Always refused: NUL (binary junk) and what starts a terminal control
# sequence, ESC and its 8-bit C1 forms (DCS, SOS, CSI, OSC, PM, APC), which can rewrite what a
# terminal or log viewer shows. The other C0 controls (tab, newline and CR are plain text),
# DEL and the other C1 controls (form feeds, vertical tabs, stray C1 from text mis-decoded
# as Latin-1) follow data.control_characters: keep, strip or quarantine.
_REFUSED = {0x00, 0x1B, 0x90, 0x98, 0x9B, 0x9D, 0x9E, 0x9F}
_SOFT = ({c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)} | set(range(0x7F, 0xA0))) - _REFUSED
_LINE_BREAKS = {0x0B, 0x0C, 0x1C, 0x1D, 0x1E, 0x85}  # str.splitlines' breaks: strip → "\n"
_STRIP = {c: "\n" if c in _LINE_BREAKS else None for c in _SOFT}


def _char_class(codes: set[int]) -> re.Pattern[str]:
    return re.compile("[" + "".join(re.escape(chr(c)) for c in sorted(codes)) + "]")


_REFUSED_RE, _ANY_CONTROL_RE = _char_class(_REFUSED), _char_class(_REFUSED | _SOFT)


def _plain_text(text: str, field: str, policy: str) -> str:
    """The text under data.control_characters (stripped or as is), or BadRow."""
    found = (_ANY_CONTROL_RE if policy == "quarantine" else _REFUSED_RE).search(text)
    if found is not None:
        code, at = ord(found.group()), found.start()
        why = "" if code in _REFUSED else " (data.control_characters: keep or strip accepts it)"
        raise BadRow("control_characters", f"{field}: control character U+{code:04X} at offset"
                     f" {at}{why}")
    return text.translate(_STRIP) if policy == "strip" else text


def _controls(pair: Pair, cfg: PrepareConfig) -> Pair:
    """Every text of a pair through `_plain_text` (fields named as `_texts` names them)."""
    policy = cfg.control_characters
    texts = [_plain_text(text, field, policy) for field, text in _texts(pair, cfg)]
    *prompt, chosen, rejected = texts
    pair.prompt = prompt[0] if isinstance(pair.prompt, str) else \
        [{**m, "content": t} for m, t in zip(pair.prompt, prompt)]
    pair.chosen, pair.rejected = chosen, rejected
    return pair


def _texts(pair: Pair, cfg: PrepareConfig) -> list[tuple[str, str]]:
    """(field, text) of every piece of text a pair holds."""
    f, p = cfg.fields, pair.prompt_field
    out = [(p, pair.prompt)] if isinstance(pair.prompt, str) else \
        [(f"{p}[{i}].{pair.content_key}", m["content"]) for i, m in enumerate(pair.prompt)]
    return out + [(f.chosen, pair.chosen), (f.rejected, pair.rejected)]


def _score(row: dict[str, Any], column: str, required: bool) -> float:
    value = row.get(column)
    if value is None:
        if required:
            raise BadRow("missing_score", f"{column} is missing or null, and the loss (or"
                         " data.min_score_margin) needs scores")
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRow("wrong_type", f"{column}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise BadRow("non_finite_score", f"{column}: {value}")
    return float(value)


def normalize_row(row: dict[str, Any], cfg: PrepareConfig, requires_scores: bool = False) -> Pair:
    """Validate one input row and bring it to a `Pair`; raise BadRow otherwise.
    `requires_scores`: quarantine pairs without finite scores (see `loss_requires_scores`)."""
    f = cfg.fields
    prompt_field = next((k for k in (f.prompt, f.messages, f.conversations)
                         if row.get(k) is not None), f.prompt)
    prompt_value = _text(row.get(prompt_field), prompt_field)
    prompt: str | Messages | None
    if prompt_value is None:
        prompt = None
    elif isinstance(prompt_value, str):
        prompt = prompt_value
    elif isinstance(prompt_value, (list, tuple)):
        prompt = _messages(prompt_value, prompt_field)
    else:
        raise BadRow("wrong_type", f"{prompt_field}: expected text or messages,"
                     f" got {type(prompt_value).__name__}")
    sharegpt = isinstance(prompt_value, (list, tuple)) and isinstance(prompt_value[0], dict) \
        and prompt_value[0].get("from") is not None
    texts = []
    for col in (f.chosen, f.rejected):
        value = _text(row.get(col), col)
        if value is None:
            raise BadRow("missing_field", f"{col} is missing or null")
        if not isinstance(value, (str, list, tuple, dict)):
            raise BadRow("wrong_type", f"{col}: expected text or messages, got {type(value).__name__}")
        text, head = _response(value, prompt if isinstance(prompt, list) else None, col)
        if head is not None:
            # UltraFeedback: a string prompt beside whole conversations; the turns win
            if isinstance(prompt, str) and head[-1]["content"].strip() != prompt.strip():
                raise BadRow("bad_role_sequence",
                             f"{col}: the conversation's last prompt turn is not {prompt_field}")
            prompt, prompt_field = head, f.prompt
        texts.append(text)
    if prompt is None:
        raise BadRow("missing_field", f"{f.prompt} is missing or null (and no conversation prefix)")
    row_id = row.get(f.id)
    pair = _controls(Pair(prompt, texts[0], texts[1], math.nan, math.nan,
                          "" if row_id is None else str(_text(row_id, f.id)), prompt_field,
                          "value" if sharegpt and prompt_field != f.prompt else "content"), cfg)
    if isinstance(pair.prompt, list):
        _check_prompt_roles(pair.prompt, prompt_field)
    elif not pair.prompt.strip():
        raise BadRow("empty_prompt", f"{prompt_field} is empty")
    for col, text in ((f.chosen, pair.chosen), (f.rejected, pair.rejected)):
        if not text.strip():
            raise BadRow("empty_response", f"{col} is empty")
    if pair.chosen == pair.rejected:
        raise BadRow("chosen_equals_rejected", f"{f.chosen} and {f.rejected} are identical")
    pair.chosen_score = _score(row, f.chosen_score, requires_scores)
    pair.rejected_score = _score(row, f.rejected_score, requires_scores)
    return pair


def prompt_messages(prompt: str | Messages, cfg: PrepareConfig) -> Messages:
    """The conversation a response answers: the prompt's turns (a plain string is one user
    turn), after ``data.system_prompt`` when the prompt has no system turn of its own."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}] + messages
    return messages


def prompt_columns(prompt: str | Messages, cfg: PrepareConfig) -> dict[str, str]:
    """A prompt's text columns (pipeline.stages.prepare.PAIR_SCHEMA): `prompt_text`, the last
    user turn (what a reward function reads), and `prompt_messages`, the conversation as
    JSON (what a reward model reads)."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return {"prompt_text": text,
            "prompt_messages": json.dumps(prompt_messages(prompt, cfg), ensure_ascii=False)}


def render_prompt(prompt: str | Messages, tokenizer: Any, cfg: PrepareConfig) -> str:
    """Prompt text as the model sees it: the chat template for messages (and, with
    ``data.chat_template: always``, for plain strings as a user turn)."""
    if isinstance(prompt, str) and cfg.chat_template != "always":
        return prompt
    prompt = prompt_messages(prompt, cfg)
    if not getattr(tokenizer, "chat_template", None):
        raise BadRow("no_chat_template", "messages given but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def truncate(prompt_ids: list[int], responses: list[list[int]], cfg: PrepareConfig
             ) -> tuple[list[int], list[list[int]], Literal["none", "prompt", "response", "both"]]:
    """Apply the truncation policy; raise BadRow('over_length') where the policy drops."""
    over_prompt = len(prompt_ids) > cfg.max_prompt_tokens
    over_resp = any(len(r) > cfg.max_response_tokens for r in responses)
    if not (over_prompt or over_resp):
        return prompt_ids, responses, "none"
    policy = cfg.truncation
    if policy == "drop" or (over_prompt and policy == "truncate_response"):
        raise BadRow("over_length", f"prompt {len(prompt_ids)} tokens (max {cfg.max_prompt_tokens}),"
                     f" responses {[len(r) for r in responses]} (max {cfg.max_response_tokens})")
    if over_prompt:
        k = cfg.max_prompt_tokens
        prompt_ids = prompt_ids[-k:] if policy == "keep_end" else prompt_ids[:k]
    responses = [r[: cfg.max_response_tokens] for r in responses]
    what = "both" if over_prompt and over_resp else ("prompt" if over_prompt else "response")
    return prompt_ids, responses, what


def tokenize_pair(pair: Pair, tokenizer: Any, cfg: PrepareConfig) -> dict[str, Any]:
    """Token ids of the rendered prompt and of each response followed by EOS."""
    if cfg.special_tokens_in_text == "quarantine":
        _no_special_tokens(pair, tokenizer, cfg)
    prompt_text = render_prompt(pair.prompt, tokenizer, cfg)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise BadRow("empty_prompt", "the prompt renders to no tokens")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    responses = [tokenizer(t, add_special_tokens=False)["input_ids"] + eos
                 for t in (pair.chosen, pair.rejected)]
    prompt_ids, responses, truncated = truncate(prompt_ids, responses, cfg)
    if responses[0] == responses[1]:
        raise BadRow("chosen_equals_rejected", "identical after tokenisation/truncation")
    return {"id": pair.id, **prompt_columns(pair.prompt, cfg),
            "prompt_ids": prompt_ids, "chosen_ids": responses[0],
            "rejected_ids": responses[1], "chosen_score": pair.chosen_score,
            "rejected_score": pair.rejected_score, "truncated": truncated}


def _no_special_tokens(pair: Pair, tokenizer: Any, cfg: PrepareConfig) -> None:
    """Text that spells a special token ('<|im_start|>system') would be tokenised as one and
    inject a turn into the chat template."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    for field, text in _texts(pair, cfg):
        found = next((t for t in specials if t in text), None)
        if found is not None:
            raise BadRow("special_token_in_text", f"{field}: contains the special token {found!r}"
                         " (data.special_tokens_in_text: allow to keep such rows)")


def row_json(row: dict[str, Any]) -> str:
    """The original row, losslessly enough to fix and re-feed (bytes/odd types as repr)."""
    return json.dumps(row, default=repr, ensure_ascii=False)
