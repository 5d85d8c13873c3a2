"""A whole run on data shaped like real chat datasets, not the toy world's ~50-token pairs.

Long multi-turn conversations (a system turn, up to nine earlier turns, assistant responses
of 1-5k characters: tests/data/make_long_chat.py) in TRL's conversational layout, with the
limits a user sets for such data (`max_prompt_tokens: 192`, `max_response_tokens: 256`,
`truncation: keep_end`), 2 Ray Train workers × ZeRO-3 and `sigmoid`: an offline round, then
an online round sampling the round-0 policy. On this kind of data training once hung after
a few steps (ranks calling the LM head a different number of times); the run must finish,
train on every pair, and report the truncation it did.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

N_PAIRS = 32  # 4 optimizer steps of 8 pairs, each rank's 4 differing in length


def test_long_multi_turn_data_runs_offline_then_online(ray_cluster, make_config, reward_model_dir,
                                                       tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from make_long_chat import write_long_chat

    from pipeline.dag import console, run_pipeline

    train = write_long_chat(tmp_path / "data" / "train.parquet", n_pairs=N_PAIRS, seed=0)
    held_out = write_long_chat(tmp_path / "data" / "eval.parquet", n_pairs=16, seed=1)
    run_dir = tmp_path / "run"
    engine = {"dtype": "float32", "max_model_len": 512}
    cfg = make_config(
        run_dir,
        data={"train": [str(train)], "eval": [str(held_out)], "max_prompt_tokens": 192,
              "max_response_tokens": 256, "truncation": "keep_end"},
        loss={"name": "sigmoid", "params": {"beta": 0.1}},
        train={"num_workers": 2, "micro_batch_size": 4, "global_batch_size": 8,
               "learning_rate": 5e-5, "stall_timeout_s": 180, "max_failures": 0},
        reference={"batch_size": 32, "engine": engine},
        sampling={"batch_size": 32, "n": 4, "max_tokens": 32, "engine": engine},
        rounds={"count": 2, "mode": "online", "prompts_per_round": 24, "min_margin": 0.01},
        # the online round's samples are scored by a HF reward model in its actor (the DAG's
        # score stage on long conversations), the held-out ones by the toy gold reward
        reward={"kind": "reward_model", "model": str(reward_model_dir), "function": None,
                "batch_size": 16},
        eval={"num_prompts": 8, "gold_reward": "pipeline.toy.reward:toy_gold_rewards"})
    with console.capture() as captured:
        assert run_pipeline(cfg) == 0
    out = captured.get()
    print(out)

    def outputs(k, stage):
        return json.loads((run_dir / f"round-{k}" / stage / "manifest.json").read_text())["outputs"]

    prepared = outputs(0, "prepare")
    print(f"prepare: {json.dumps(prepared, default=str)[:600]}")
    pairs = pq.read_table(run_dir / "round-0" / "prepare" / "train" / "pairs.parquet")
    assert pairs.num_rows == N_PAIRS
    truncated = pairs.column("truncated").to_pylist()
    assert sum(t != "none" for t in truncated) > 0.75 * N_PAIRS  # most pairs run over the limits
    assert max(len(p) for p in pairs.column("prompt_ids").to_pylist()) == 192
    trained = [outputs(k, "train") for k in (0, 1)]
    print(f"train: {[{k: t[k] for k in ('num_pairs', 'optimizer_steps', 'steps_done')} for t in trained]}")
    assert trained[0]["num_pairs"] == N_PAIRS and trained[0]["steps_done"] == N_PAIRS // 8
    assert trained[1]["steps_done"] == trained[1]["optimizer_steps"] >= 1
    # the reward model scored every sample on its whole conversation, not the last turn alone
    assert outputs(1, "score")["samples"] == 24 * 4
    scored = pq.read_table(run_dir / "round-1" / "score" / "scored").to_pylist()
    assert max(len(json.loads(r["prompt_messages"])) for r in scored) > 3
    assert len({round(r["score"], 6) for r in scored}) > 1
    for k in (0, 1):
        metrics = outputs(k, "evaluate")["metrics"]
        assert "eval/kl" in metrics
        # 16 distinct conversations, though they end in only 6 distinct questions
        assert metrics["eval/prompts"] == 8  # eval.num_prompts
