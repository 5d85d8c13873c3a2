"""Row normalisation, validation reasons, chat rendering, tokenisation and truncation."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.config import PrepareConfig
from pipeline.data import BadRow, normalize_row, render_prompt, tokenize_pair, truncate
from pipeline.toy.build import train_tokenizer

CFG = PrepareConfig()
USER = [{"role": "user", "content": "List two fruits."}]
ASSIST = lambda text: [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tok():
    corpus = ["List two fruits.", "apple, pear.", "fig, plum, kiwi.", "Here are two: a, b."] * 50
    return train_tokenizer(corpus, vocab_size=300, max_length=256)


@pytest.mark.parametrize("row", [
    {"prompt": "List two fruits.", "chosen": "apple, pear.", "rejected": "rock."},
    {"prompt": USER, "chosen": ASSIST("apple, pear."), "rejected": ASSIST("rock.")},
    {"chosen": USER + ASSIST("apple, pear."), "rejected": USER + ASSIST("rock.")},
    {"prompt": USER, "chosen": USER + ASSIST("apple, pear."), "rejected": ASSIST("rock.")},
    {"messages": USER, "chosen": "apple, pear.", "rejected": "rock."},
])
def test_formats_normalise_to_the_same_pair(row):
    pair = normalize_row(row, CFG)
    assert (pair.chosen, pair.rejected) == ("apple, pear.", "rock.")
    prompt = pair.prompt if isinstance(pair.prompt, str) else pair.prompt[-1]["content"]
    assert prompt == "List two fruits."
    assert math.isnan(pair.chosen_score)


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "p", "rejected": "b"}, "missing_field"),
    ({"prompt": "p", "chosen": None, "rejected": "b"}, "missing_field"),
    ({"chosen": "a", "rejected": "b"}, "missing_field"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "wrong_type"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, "empty_response"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "empty_prompt"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "chosen_equals_rejected"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": float("nan")}, "non_finite_score"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": "high"}, "wrong_type"),
    ({"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"}, "bad_messages"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "bad_messages"),
    ({"prompt": USER + ASSIST("x"), "chosen": "a", "rejected": "b"}, "bad_role_sequence"),
    ({"prompt": USER, "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "bad_role_sequence"),
    ({"prompt": USER, "chosen": [{"role": "user", "content": "other"}] + ASSIST("a"),
      "rejected": "b"}, "bad_role_sequence"),
])
def test_each_bad_row_has_a_reason(row, reason):
    with pytest.raises(BadRow) as err:
        normalize_row(row, CFG)
    assert err.value.reason == reason


@pytest.mark.parametrize("row, reason", [
    ({"prompt": 7, "chosen": "a", "rejected": "b"}, "wrong_type"),
    ({"prompt": "p", "chosen": b"\xff", "rejected": "b"}, "undecodable_text"),
    ({"prompt": [{"role": "user", "content": b"\xc3"}], "chosen": "a", "rejected": "b"},
     "undecodable_text"),
    ({"prompt": "Other.", "chosen": USER + ASSIST("a"), "rejected": USER + ASSIST("b")},
     "bad_role_sequence"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 1.0}, "missing_score"),
])
def test_bad_rows_with_scores_required(row, reason):
    with pytest.raises(BadRow) as err:
        normalize_row(row, CFG, requires_scores=True)
    assert err.value.reason == reason


def test_bytes_and_ultrafeedback_prompts_normalise():
    pair = normalize_row({"prompt": "List two fruits.", "chosen": USER + ASSIST("apple, pear."),
                          "rejected": USER + ASSIST("rock."), "chosen_score": 1.0,
                          "rejected_score": 0.0}, CFG, requires_scores=True)
    assert pair.prompt == USER and pair.chosen_score == 1.0
    pair = normalize_row({"prompt": b"p", "chosen": "a\u00e9".encode(), "rejected": "b"}, CFG)
    assert (pair.prompt, pair.chosen) == ("p", "a\u00e9")


def test_chat_rendering_and_tokenisation(tok):
    cfg = PrepareConfig(chat_template="always", system_prompt="Be brief.")
    text = render_prompt("List two fruits.", tok, cfg)
    assert text.endswith("<|im_start|>assistant\n") and "Be brief." in text
    assert render_prompt("List two fruits.", tok, CFG) == "List two fruits."
    out = tokenize_pair(normalize_row({"prompt": USER, "chosen": "apple, pear.",
                                       "rejected": "fig."}, cfg), tok, cfg)
    assert out["chosen_ids"][-1] == tok.eos_token_id
    assert tok.decode(out["chosen_ids"][:-1]) == "apple, pear."
    assert out["prompt_text"] == "List two fruits." and out["truncated"] == "none"
    # the whole conversation goes along for a reward model, with the system turn it got
    assert json.loads(out["prompt_messages"]) == [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "List two fruits."}]
    chat = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi, I need fruit."},
            {"role": "assistant", "content": "Which kind?"},
            {"role": "user", "content": "List two fruits."}]
    out = tokenize_pair(normalize_row({"prompt": chat, "chosen": "apple, pear.",
                                       "rejected": "fig."}, cfg), tok, cfg)
    assert out["prompt_text"] == "List two fruits." and json.loads(out["prompt_messages"]) == chat


@pytest.mark.parametrize("policy, expect_prompt", [("keep_end", [3, 4, 5]), ("keep_start", [1, 2, 3])])
def test_truncation_policies(policy, expect_prompt):
    cfg = PrepareConfig(max_prompt_tokens=3, max_response_tokens=2, truncation=policy)
    prompt, responses, what = truncate([1, 2, 3, 4, 5], [[7, 8, 9], [6]], cfg)
    assert prompt == expect_prompt and responses == [[7, 8], [6]] and what == "both"


@pytest.mark.parametrize("policy", ["drop", "truncate_response"])
def test_truncation_drops_long_prompts(policy):
    cfg = PrepareConfig(max_prompt_tokens=3, truncation=policy)
    with pytest.raises(BadRow, match="over_length"):
        truncate([1, 2, 3, 4], [[7], [6]], cfg)
    cfg = PrepareConfig(max_response_tokens=1, truncation="truncate_response")
    assert truncate([1], [[7, 8], [6]], cfg)[1] == [[7], [6]]
