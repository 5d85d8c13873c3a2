"""workers.rewards.RewardModelScorer on conversations: it reads the whole conversation in its
own chat template, and a text over its length keeps the end (the response), not the start."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from workers.rewards import RewardModelScorer

LONG = "Tell me about the weather in the hills and the sea, and the roads between them. " * 8
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": LONG},
        {"role": "assistant", "content": "It rains in the hills. " * 10},
        {"role": "user", "content": "List two fruits."}]


@pytest.fixture(scope="module")
def reward_model(toy_world, tmp_path_factory):
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(AutoConfig.from_pretrained(toy_world.model_dir,
                                                                      num_labels=1))
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(toy_world.model_dir).save_pretrained(out)
    return out


def _forward(path, ids):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_the_reward_model_reads_the_whole_conversation_and_keeps_its_end(reward_model):
    scorer = RewardModelScorer(str(reward_model), max_length=48)
    batch = pa.table({"prompt_text": ["List two fruits."] * 2,
                      "prompt_messages": [json.dumps(CHAT), json.dumps(CHAT[-1:])],
                      "response": ["apple, pear."] * 2})
    texts = scorer.texts([CHAT], ["apple, pear."])
    assert "You are terse." in texts[0] and "It rains in the hills." in texts[0]
    full = scorer.tok(texts[0], add_special_tokens=False)["input_ids"]
    assert len(full) > 48  # the conversation runs over the scorer's length
    scores = scorer(batch).column("score").to_pylist()
    # the last 48 tokens were scored: the response and the latest turn, not the system turn
    assert scores[0] == pytest.approx(_forward(reward_model, full[-48:]), abs=1e-4)
    # the earlier turns change the score: they are read
    assert scores[0] != pytest.approx(scores[1], abs=1e-4)
    # without prompt_messages (pairs prepared by an earlier version) the prompt is one user turn
    old = scorer(batch.drop_columns(["prompt_messages"])).column("score").to_pylist()
    assert old == pytest.approx([scores[1]] * 2, abs=1e-5)
