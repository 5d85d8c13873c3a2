"""The alignment study's core (bench/study_*.py) on a tiny untrained toy world: step-0
invariants (policy == reference ⇒ h = 0, KL = 0, win rate ½), the principled target h* as
the spec defines it, the pipeline's pair rules for online rounds, and a 2-step end-to-end run."""

from __future__ import annotations

import csv
import dataclasses
import math
import random

import pytest
import torch

from bench.study_data import add_reference, data_config, prompt_rows, tokenize_rows
from bench.study_losses import ARMS, STEP_KEYS, StudyConfig, run_study, write_outputs
from bench.study_sample import (
    SampleSettings,
    checkpoint_metrics,
    generate,
    online_pairs,
    quality_metrics,
)
from bench.study_train import TrainSettings, gap_metrics, train_steps
from pipeline.config import RoundsConfig
from pipeline.toy.reward import toy_gold_reward
from workers.logprobs import ResponseLogps
from workers.losses import PairLogps

BETA = 0.1


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is as fast, and does not spin-wait on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """An untrained tiny Qwen2 + toy tokenizer and toy-task pairs, written like a toy world."""
    from pipeline.toy.build import (
        Pair,
        ToyConfig,
        init_model,
        pair_table,
        prompts_table,
        save_model,
        tokenizer_corpus,
        train_tokenizer,
        write_parquet,
    )
    from pipeline.toy.task import parse_prompt, sample_prompts, sample_response

    torch.manual_seed(0)
    cfg = dataclasses.replace(
        ToyConfig.resolve(0, 8, 4, 0.0, 1, True), hidden_size=32, intermediate_size=64)
    rng = random.Random(0)
    prompts = sample_prompts(rng, 48)
    tok = train_tokenizer(tokenizer_corpus(prompts, 300, rng), 400, cfg.max_positions)
    pairs = []
    for prompt in prompts[:40]:
        spec = parse_prompt(prompt)
        a, b = sample_response(spec, rng), sample_response(spec, rng)
        sa, sb = toy_gold_reward(prompt, a), toy_gold_reward(prompt, b)
        if a != b and sa != sb:
            pairs.append(Pair(prompt, a, b, sa, sb) if sa > sb else Pair(prompt, b, a, sb, sa))
    assert len(pairs) >= 24
    pairs[0] = pairs[0].flipped()  # one reversed pair: excluded by the scores target
    root = tmp_path_factory.mktemp("tiny-world")
    save_model(init_model(cfg, tok), tok, root / "model")
    write_parquet(pair_table(pairs[:16], "train", chat=False), root / "train.parquet")
    write_parquet(pair_table(pairs[16:24], "eval", chat=False), root / "eval.parquet")
    write_parquet(prompts_table(prompts[40:]), root / "prompts.parquet")
    return root


@pytest.fixture(scope="module")
def loaded(tiny_world):
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "model", dtype=torch.float32)
    reference = ResponseLogps(model).eval()
    raw = pq.read_table(tiny_world / "train.parquet").to_pylist()
    rows = add_reference(tokenize_rows(raw, tok, data_config()), reference, tok.pad_token_id)
    texts = [r["prompt"] for r in pq.read_table(tiny_world / "prompts.parquet").to_pylist()]
    return tok, model, reference, rows, prompt_rows(texts, tok, data_config())


def fresh_policy(model) -> ResponseLogps:
    import copy

    return ResponseLogps(copy.deepcopy(model))


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_h_is_zero_at_step_zero_and_training_moves_it(loaded, arm) -> None:
    tok, model, _, rows, _ = loaded
    records = list(train_steps(fresh_policy(model), rows, ARMS[arm], TrainSettings(
        steps=3, batch_size=8, learning_rate=1e-3, warmup_ratio=0.0), 0, tok.pad_token_id, BETA))
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(set(STEP_KEYS) <= set(r) for r in records)
    first = records[0]
    assert abs(first["h_mean"]) < 1e-4 and first["h_std"] < 1e-4  # policy == reference
    assert abs(first["logratio_chosen"]) < 1e-4 and abs(first["logratio_rejected"]) < 1e-4
    assert first["gap_to_target"] == pytest.approx(first["h_star_mean"], abs=1e-3)  # |0 − h*|
    assert abs(records[-1]["h_mean"]) > 1e-3  # the updates changed the policy's gap
    assert all(math.isfinite(r["loss"]) for r in records)


def test_gap_metrics_use_the_spec_target() -> None:
    # h = (pw − rw) − (pl − rl) = 3, 12, −2; scores gaps 0.5, 1.0 and a reversed pair (excluded)
    logps = PairLogps(
        policy_chosen=torch.tensor([-10.0, -5.0, -8.0]),
        policy_rejected=torch.tensor([-14.0, -20.0, -7.0]),
        ref_chosen=torch.tensor([-11.0, -6.0, -8.0]), ref_rejected=torch.tensor([-12.0, -9.0, -9.0]),
        chosen_len=torch.tensor([4.0, 5.0, 3.0]), rejected_len=torch.tensor([4.0, 6.0, 3.0]),
        chosen_score=torch.tensor([1.0, 1.5, 0.2]), rejected_score=torch.tensor([0.5, 0.5, 0.7]))
    m = gap_metrics(logps, BETA)
    h_star = [0.5 / BETA, 1.0 / BETA]  # (s_w − s_l)/β on the valid pairs
    assert m["h_mean"] == pytest.approx((3 + 12 - 2) / 3)
    assert m["h_std"] == pytest.approx(torch.tensor([3.0, 12.0, -2.0]).std(unbiased=False).item())
    assert m["h_star_mean"] == pytest.approx(sum(h_star) / 2)
    assert m["gap_to_target"] == pytest.approx((abs(3 - h_star[0]) + abs(12 - h_star[1])) / 2)
    assert m["frac_past_target"] == pytest.approx(0.5)
    assert m["reward_acc"] == pytest.approx(2 / 3) and m["ranking_acc"] == pytest.approx(2 / 3)
    bt = gap_metrics(logps, BETA, "bradley_terry")
    assert bt["h_star_mean"] == pytest.approx(math.log(0.75 / 0.25) / BETA, rel=1e-5)
    assert gap_metrics(logps, BETA, "constant")["h_star_mean"] == pytest.approx(10.0)


def test_step_zero_checkpoint_reproduces_the_reference(loaded) -> None:
    tok, model, reference, _, prompts = loaded
    s = SampleSettings(k=2, max_new_tokens=8)
    ref = quality_metrics(generate(reference.lm, tok, prompts[:4], s, seed=7))
    m = checkpoint_metrics(fresh_policy(model), reference, tok, prompts[:4], ref["_gold"], s, 7)
    assert m["kl"] == pytest.approx(0.0, abs=1e-5)
    assert m["win_rate"] == 0.5
    assert m["gold"] == pytest.approx(ref["gold"])
    assert 1 <= m["length_tokens"] <= 8


def test_online_pairs_follow_the_pipeline_rules(loaded) -> None:
    tok, model, _, _, prompts = loaded
    rounds = RoundsConfig(count=2, mode="online", min_margin=0.05)
    pairs, counts, mean_gold = online_pairs(fresh_policy(model), tok, prompts[:6],
                                            SampleSettings(k=4, max_new_tokens=12), rounds, 3)
    assert counts["prompts"] == 6 and counts["samples"] == 24
    assert len(pairs) + counts.get("ties_or_near_ties", 0) == 6  # best_vs_worst: one per prompt
    assert 0.0 <= mean_gold <= 2.0
    for p in pairs:
        assert p["chosen_score"] - p["rejected_score"] > 0.05
        assert p["chosen_score"] == pytest.approx(toy_gold_reward(
            p["prompt_text"], tok.decode(p["chosen_ids"], skip_special_tokens=True)))


def test_tiny_study_end_to_end(tiny_world, tmp_path) -> None:
    cfg = StudyConfig(world=str(tiny_world), out=str(tmp_path), seeds=[0],
                      arms=["dpo", "principled-scores"], online_arms=["principled-scores"],
                      steps=2, batch_size=4, checkpoint_every=1, subset_pairs=8,
                      eval_prompts=4, max_new_tokens=8, online_rounds=1, prompts_per_round=8,
                      online_samples=2, online_epochs=1, threads=1)
    results = run_study(cfg, log=lambda *_: None)
    steps = [r for r in results["steps"] if r["round"] == 0]
    assert [(r["arm"], r["step"]) for r in steps] == [("dpo", 0), ("dpo", 1),
                                                     ("principled-scores", 0),
                                                     ("principled-scores", 1)]
    offline = [c for c in results["checkpoints"] if c["round"] == 0]
    assert [c["step"] for c in offline] == [0, 1, 2, 0, 1, 2]
    for c in offline[::3]:  # step 0 of each arm: policy == reference
        assert c["kl"] == pytest.approx(0.0, abs=1e-5) and c["win_rate"] == 0.5
        assert abs(c["train/h_mean"]) < 1e-4 and abs(c["eval/h_mean"]) < 1e-4
    assert [o["arm"] for o in results["online"]] == ["principled-scores"]
    meta = {"command": "test", "wall_s": 0, "torch": "", "transformers": "", "threads": 1}
    paths = write_outputs(results, cfg, meta)
    assert {p.name for p in paths} == {"h_over_steps.png", "chosen_logp_over_steps.png",
                                       "gold_vs_kl.png", "online_rounds.png"}
    assert all(p.stat().st_size > 1000 for p in paths)
    with (tmp_path / "checkpoints.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(results["checkpoints"])
    summary = (tmp_path / "summary.md").read_text()
    assert "| dpo |" in summary and "| principled-scores | 1 |" in summary
