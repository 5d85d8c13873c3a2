"""Every registered loss trains (real optimizer steps of the Ray-free train step) and gets
evaluate's metrics on the toy world, with what its registry entry says it needs produced the
way the pipeline produces it; a loss whose needs the round mode cannot meet is refused."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.config import ConfigError, LossConfig, PrepareConfig, parse_config
from pipeline.data import normalize_row, tokenize_pair
from pipeline.pairs import win_rates
from pipeline.stages.evaluate import eval_loss_metrics, eval_pair_logps
from workers.logprobs import ResponseLogps
from workers.losses import LOSS_NEEDS, LOSSES, NEEDS, loss_needs, resolve_params
from workers.recipe.checkpoint import LoopState
from workers.train_step import RunningMean, pair_loss, policy_pair_logps, rows_to_pairs

BATCH = 4


@pytest.fixture(scope="module")
def world(toy_world):
    """The toy world's tokenizer, model and tokenised train/eval pairs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_world.model_dir)
    model = AutoModelForCausalLM.from_pretrained(toy_world.model_dir, dtype=torch.float32)
    data = PrepareConfig(chat_template="always", max_prompt_tokens=64,
                      max_response_tokens=64)

    def pairs(path):
        return [tokenize_pair(normalize_row(row, data), tok, data)
                for row in pq.read_table(path).to_pylist()]

    return tok, model, pairs(toy_world.train_path), pairs(toy_world.eval_path)


def naive_tokens(model, prompt, response):
    """Per-token log p(y_t) and log Σ_v p(v)² from one full-vocabulary float64 forward."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)[len(prompt) - 1:]
    tok = logp.gather(-1, ids[0, len(prompt):, None])[:, 0]
    return tok.tolist(), torch.logsumexp(2 * logp, -1).tolist()


def with_reference(reference, rows):
    """What the reference stage adds (summed log-probs, prefix sums, mismatched completions:
    each row's prompt with the previous row's responses), computed with the HF model."""
    out = [dict(r) for r in rows]
    for side in ("chosen", "rejected"):
        ids = [r[f"{side}_ids"] for r in rows]
        for r, kl in zip(out, ids[-1:] + ids[:-1]):
            r[f"kl_{side}_ids"] = kl
            r[f"ref_kl_{side}_logp"] = sum(naive_tokens(reference, r["prompt_ids"], kl)[0])
    for r in out:
        c = naive_tokens(reference, r["prompt_ids"], r["chosen_ids"])[0]
        j = naive_tokens(reference, r["prompt_ids"], r["rejected_ids"])[0]
        k = min(len(c), len(j))
        r.update(ref_chosen_logp=sum(c), ref_rejected_logp=sum(j),
                 ref_chosen_prefix_logp=sum(c[:k]), ref_rejected_prefix_logp=sum(j[:k]))
        r["chosen_winrate"], r["rejected_winrate"] = win_rates([r["chosen_score"],
                                                                r["rejected_score"]])
    return out


def columns(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


@pytest.fixture(scope="module")
def reference_rows(world):
    _tok, model, train, evaluation = world
    return with_reference(model, train[:3 * BATCH]), with_reference(model, evaluation[:8])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_trains_and_evaluates(name, world, reference_rows):
    tok, base, _, _ = world
    train, evaluation = reference_rows
    params = resolve_params(name, {})
    needs = loss_needs(name, params)
    model = copy.deepcopy(base).train()
    module = ResponseLogps(model, chunk_size=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    running = RunningMean()
    for step in range(3):
        rows = columns(train[step * BATCH:(step + 1) * BATCH])
        loss, out = pair_loss(module, rows_to_pairs(rows, tok.pad_token_id), name, params, running)
        assert torch.isfinite(loss), (name, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(model.parameters(), before))
    assert moved > 0, f"{name}: the optimizer steps changed nothing"
    if "running_stats" in needs:
        assert running.count == 3 * 2 * BATCH and out.metrics["bco/delta"] == pytest.approx(
            running.mean, abs=1e-6)

    # evaluate: the policy's per-token numbers (vLLM's in the pipeline; a HF forward here)
    model.eval()
    per_side = {side: [naive_tokens(model, r["prompt_ids"], r[f"{side}_ids"]) for r in evaluation]
                for side in ("chosen", "rejected", "kl_chosen", "kl_rejected")}
    tokens = {s: [t for t, _ in v] for s, v in per_side.items()}
    logps = eval_pair_logps(
        evaluation, tokens["chosen"], tokens["rejected"], needs,
        pol_kl=(tokens["kl_chosen"], tokens["kl_rejected"]),
        pol_sq=tuple([q for _, q in per_side[s]] for s in ("chosen", "rejected")),
        running_mean=running.mean if running.count else None)
    metrics = eval_loss_metrics(LossConfig(name=name), logps)
    for key in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins",
                "eval/ranking/accuracy"):
        assert math.isfinite(metrics[key]), (name, key)


def test_wpo_weights_and_kto_kl_come_from_the_policy(world, reference_rows):
    """The train step's WPO log-weights (from the chunked LM head of the one forward) and
    KTO's policy KL terms (mismatched completions) equal a naive full-vocabulary forward."""
    tok, model, _, _ = world
    rows = reference_rows[0][:BATCH]
    pairs = rows_to_pairs(columns(rows), tok.pad_token_id)
    logps = policy_pair_logps(ResponseLogps(model, chunk_size=5), pairs,
                              frozenset({"token_stats", "kl_pairs"}))
    expected = []
    for side in ("chosen", "rejected"):
        for r in rows:
            t, q = naive_tokens(model, r["prompt_ids"], r[f"{side}_ids"])
            expected.append(sum(a - b for a, b in zip(t, q)) / len(t))
    got = torch.cat([logps.chosen_wpo_logw, logps.rejected_wpo_logw]).double()
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
    kl = [sum(naive_tokens(model, r["prompt_ids"], r[f"kl_{side}_ids"])[0])
          for side in ("chosen", "rejected") for r in rows]
    torch.testing.assert_close(logps.kl_policy.double(), torch.tensor(kl, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    assert rows[1]["kl_chosen_ids"] == rows[0]["chosen_ids"]  # a mismatched completion
    assert not logps.kl_policy.requires_grad  # z0 has no gradient


def test_running_mean_is_the_count_weighted_mean_and_survives_a_checkpoint():
    running = RunningMean()
    running.update(torch.tensor([1.0, 3.0]))
    running.update(torch.tensor([6.0, 6.0, 6.0, float("nan")]))  # non-finite: not folded in
    running.update(torch.tensor([5.0, 6.0, 7.0, 8.0]))
    assert running.count == 6 and running.mean == pytest.approx((1 + 3 + 5 + 6 + 7 + 8) / 6)
    state = LoopState(step=3, running=running)
    restored = LoopState(**asdict(state))  # what the checkpoint's client_state holds
    assert restored.running == running and isinstance(restored.running, RunningMean)


def test_a_loss_needing_running_stats_never_falls_back_silently(world, reference_rows):
    tok, model, _, _ = world
    pairs = rows_to_pairs(columns(reference_rows[0][:BATCH]), tok.pad_token_id)
    with pytest.raises(ValueError, match="running statistics"):
        pair_loss(ResponseLogps(model), pairs, "bco", resolve_params("bco", {}))


def test_every_loss_declares_known_needs():
    assert set(LOSS_NEEDS) == set(LOSSES)
    for name in LOSSES:
        assert loss_needs(name, resolve_params(name, {})) <= NEEDS.keys(), name
    assert loss_needs("principled", resolve_params("principled", {"target": "scores"})) == \
        {"reference", "scores"}


MINIMAL = {"model": {"policy": "m"}, "data": {"train": ["d.parquet"]}}


def test_offline_refuses_a_loss_needing_win_rates(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    raw = {**MINIMAL, "loss": {"name": "sppo"}}
    with pytest.raises(ConfigError, match="'sppo' needs win_rates .*rounds.mode 'offline'"):
        parse_config(raw)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sppo.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "needs win_rates" in capsys.readouterr().err
    sampled = {**raw, "rounds": {"mode": "iterative", "count": 2},
               "reward": {"kind": "function", "function": "pipeline.toy.reward:toy_gold_rewards"}}
    cfg = parse_config(sampled)  # every round samples, round 0 too

    from pipeline.dag import Round

    assert Round(cfg, tmp_path, 0, "m", "m", {}).sampled
    assert not Round(parse_config({**sampled, "loss": {"name": "sigmoid"}}), tmp_path, 0, "m",
                     "m", {}).sampled


@pytest.mark.parametrize("name", ["kto", "wpo", "bco", "ld_dpo", "principled"])
def test_other_losses_are_accepted_offline(name):
    assert parse_config({**MINIMAL, "loss": {"name": name}}).loss.name == name
