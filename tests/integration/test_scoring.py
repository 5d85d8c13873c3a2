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


def alive_actors(class_name: str) -> list[str]:
    from ray._private.state import actors

    return [i for i, a in actors().items()
            if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]


def test_reward_model_scores_match_hf(ray_cluster, make_config, samples_dir, reward_model_dir, tmp_path):
    """The reward model's scores equal a HF forward's, and its actor lives for the run: a
    second round's scoring on the run's Scorers starts none."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.scorers import Scorers
    from pipeline.stages.score import run_score

    cfg = make_config(tmp_path / "run", reward={"kind": "reward_model", "model": str(reward_model_dir),
                                                "function": None, "batch_size": 3})
    with Scorers(cfg) as scorers:
        stats = run_score(samples_dir, cfg, tmp_path, scorers)
        started = alive_actors("RewardModelScorer")
        again = run_score(samples_dir, cfg, tmp_path / "round-2", scorers)
        assert alive_actors("RewardModelScorer") == started and len(started) == 1
    assert alive_actors("RewardModelScorer") == []  # ended with the run
    assert again == stats
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

    from pipeline.scorers import Scorers
    from pipeline.stages.score import run_score
    from workers.rewards import JudgeScorer

    cfg = make_config(tmp_path / "run", reward={"kind": "judge", "model": str(toy_world.model_dir),
                                                "function": None})
    with Scorers(cfg) as scorers:
        run_score(samples_dir, cfg, tmp_path, scorers)
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
    """A reward function that tells the test's probe actor what Ray assigned the process
    that called it and when the call ran (a short sleep inside, so that calls running at
    once overlap); scores are the response lengths."""
    import time

    import ray

    assigned = ray.get_runtime_context().get_assigned_resources()
    start = time.time()
    time.sleep(0.3)
    ray.get(ray.get_actor("score-probe").record.remote(assigned, start, time.time()))
    return [float(len(r)) for r in responses]


def probe_actor():
    """A named actor collecting (assigned resources, start, end) of each reward call; built
    in a function so Ray ships the class by value."""
    import ray

    class Probe:
        def __init__(self):
            self.seen = []

        def record(self, assigned, start, end):
            self.seen.append((assigned, start, end))

        def get(self):
            return self.seen

    return ray.remote(num_cpus=0)(Probe).options(name="score-probe").remote()


def test_score_stage_uses_the_reward_pool_config(ray_cluster, make_config, tmp_path):
    """reward.num_actors and reward.cpus_per_actor shape the scoring: a reward function runs
    in Ray Data tasks (no state to keep), at most reward.num_actors at once, each assigned
    the configured CPUs (read inside it, by the reward function)."""
    import ray

    from pipeline.stages.score import run_score

    samples = tmp_path / "samples"
    samples.mkdir()
    for f in range(8):
        rows = [{"prompt_id": f"p{f}", "prompt_text": "List two fruits.", "sample_index": i,
                 "response": RESPONSES[i]} for i in range(4)]
        pq.write_table(pa.Table.from_pylist(rows), samples / f"part-{f}.parquet")
    probe = probe_actor()
    cfg = make_config(tmp_path / "run", reward={
        "kind": "function", "function": "tests.integration.test_scoring:probe_rewards",
        "batch_size": 4, "num_actors": 2, "cpus_per_actor": 0.5})
    stats = run_score(samples, cfg, tmp_path)
    seen = ray.get(probe.get.remote())
    ray.kill(probe)
    assert stats["samples"] == 32
    assert len(seen) == 8 and all(assigned.get("CPU") == 0.5 for assigned, _, _ in seen), seen
    at_once = max(sum(1 for _, s, e in seen if s <= t < e) for _, t, _ in seen)
    assert at_once <= 2, seen  # reward.num_actors
    got = pq.read_table(tmp_path / "scored").to_pylist()
    assert sorted(r["score"] for r in got) == sorted(float(len(RESPONSES[i]))
                                                     for _ in range(8) for i in range(4))
