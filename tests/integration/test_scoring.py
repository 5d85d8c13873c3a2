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


def probe_rewards(prompts, responses):
    """A reward function that tells the test's probe actor which process called it and
    what Ray assigned that process; scores are the response lengths."""
    import os

    import ray

    assigned = ray.get_runtime_context().get_assigned_resources()
    ray.get(ray.get_actor("score-probe").record.remote(os.getpid(), assigned))
    return [float(len(r)) for r in responses]


def probe_actor():
    """A named actor collecting (pid, assigned resources); built in a function so Ray ships
    the class by value."""
    import ray

    class Probe:
        def __init__(self):
            self.seen = []

        def record(self, pid, assigned):
            self.seen.append((pid, assigned))

        def get(self):
            return self.seen

    return ray.remote(num_cpus=0)(Probe).options(name="score-probe").remote()


def test_score_stage_uses_the_reward_pool_config(ray_cluster, make_config, tmp_path):
    """reward.num_actors and reward.cpus_per_actor shape the scorer pool: two scorer actors
    are started (GCS actor table), and a scorer is assigned the configured CPUs (read inside
    it, by the reward function)."""
    import ray
    from ray._private.state import actors

    from pipeline.stages.score import run_score

    samples = tmp_path / "samples"
    samples.mkdir()
    for f in range(8):
        rows = [{"prompt_id": f"p{f}", "prompt_text": "List two fruits.", "sample_index": i,
                 "response": RESPONSES[i]} for i in range(4)]
        pq.write_table(pa.Table.from_pylist(rows), samples / f"part-{f}.parquet")
    def scorer_actors() -> set[str]:
        return {i for i, a in actors().items()
                if a["ActorClassName"] == "MapWorker(MapBatches(FunctionScorer))"}

    probe = probe_actor()
    before = scorer_actors()
    cfg = make_config(tmp_path / "run", reward={
        "kind": "function", "function": "tests.integration.test_scoring:probe_rewards",
        "batch_size": 4, "num_actors": 2, "cpus_per_actor": 0.5})
    stats = run_score(samples, cfg, tmp_path)
    seen = ray.get(probe.get.remote())
    ray.kill(probe)
    assert stats["samples"] == 32
    assert len(scorer_actors() - before) == 2  # reward.num_actors scorers were started
    assert seen and all(assigned.get("CPU") == 0.5 for _, assigned in seen), seen
    got = pq.read_table(tmp_path / "scored").to_pylist()
    assert sorted(r["score"] for r in got) == sorted(float(len(RESPONSES[i]))
                                                     for _ in range(8) for i in range(4))
