"""The score stage's pluggable rewards on real models: a HF sequence-classification reward
model and a vLLM pairwise judge, each checked against a direct HF forward."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.integration

RESPONSES = ["apple, pear.", "Sure: fig, plum, kiwi.", "rock, stone.", "apple, apple, apple."]


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("samples")
    rows = [{"prompt_id": f"p{i // 4}", "prompt_text": "List two fruits.", "sample_index": i % 4,
             "response": RESPONSES[i % 4]} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), d / "part.parquet")
    return d


@pytest.fixture(scope="module")
def reward_model_dir(toy_world, tmp_path_factory):
    """A real (untrained) HF reward model: Qwen2 with a 1-logit classification head."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(toy_world.model_dir, num_labels=1)
    model = Qwen2ForSequenceClassification(cfg)
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(toy_world.model_dir).save_pretrained(out)
    return out


def test_reward_model_scores_match_hf(ray_cluster, make_config, samples_dir, reward_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.stages.score import run_score

    cfg = make_config(tmp_path / "run", reward={"kind": "reward_model", "model": str(reward_model_dir),
                                                "function": None, "batch_size": 3})
    stats = run_score(samples_dir, cfg, tmp_path)
    got = {(r["prompt_id"], r["sample_index"]): r["score"]
           for r in pq.read_table(tmp_path / "scored").to_pylist()}
    assert stats["samples"] == 8
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for i, text in enumerate(RESPONSES):
        chat = tok.apply_chat_template([{"role": "user", "content": "List two fruits."},
                                        {"role": "assistant", "content": text}], tokenize=False)
        with torch.no_grad():
            ref = model(**tok(chat, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
        assert got[("p0", i)] == pytest.approx(ref, abs=1e-4)  # padding in a batch changes nothing
        assert got[("p1", i)] == pytest.approx(ref, abs=1e-4)


def test_judge_scores_match_hf(ray_cluster, make_config, samples_dir, toy_world, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.stages.score import run_score
    from workers.rewards import JudgeScorer

    cfg = make_config(tmp_path / "run", reward={"kind": "judge", "model": str(toy_world.model_dir),
                                                "function": None})
    run_score(samples_dir, cfg, tmp_path)
    rows = pq.read_table(tmp_path / "scored").to_pylist()
    by = {(r["prompt_id"], r["sample_index"]): r["score"] for r in rows}
    assert by[("p0", 0)] == by[("p1", 0)] == 0.5  # the anchor
    # the same judgement by a float32 HF forward
    judge = JudgeScorer.__new__(JudgeScorer)  # only its prompt building, no engine
    from transformers import AutoTokenizer

    judge.tok = AutoTokenizer.from_pretrained(toy_world.model_dir)
    a_id, b_id = (judge.tok(x, add_special_tokens=False)["input_ids"][0] for x in ("A", "B"))
    model = AutoModelForCausalLM.from_pretrained(toy_world.model_dir, dtype=torch.float32).eval()

    def p_first(a, b):
        ids = torch.tensor([judge._prompt_ids("List two fruits.", a, b)])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
        return 1.0 / (1.0 + math.exp(logp[b_id].item() - logp[a_id].item()))

    for i in range(1, 4):
        expected = 0.5 * (p_first(RESPONSES[i], RESPONSES[0]) + 1.0 - p_first(RESPONSES[0], RESPONSES[i]))
        assert by[("p0", i)] == pytest.approx(expected, abs=1e-4)
        assert 0.0 < by[("p0", i)] < 1.0
