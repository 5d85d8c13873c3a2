"""The prompts an online round samples from: one per distinct prompt the model sees."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import parse_config
from pipeline.stages.sample import prompt_pool


def test_conversations_ending_in_the_same_question_are_different_prompts(tmp_path):
    """Multi-turn prompts keep the last turn as `prompt_text` (what a reward reads), so the
    pool must tell them apart by their tokens, not by that text."""
    rows = [{"prompt_text": "List three fruits.", "prompt_ids": [1, 2, 3, 9]},
            {"prompt_text": "List three fruits.", "prompt_ids": [1, 5, 6, 7, 9]},  # other history
            {"prompt_text": "List three fruits.", "prompt_ids": [1, 2, 3, 9]},    # a duplicate
            {"prompt_text": "Name two metals.", "prompt_ids": [1, 4, 8]}]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = parse_config({"run_dir": str(tmp_path / "run"), "model": {"policy": str(tmp_path)},
                        "data": {"train": [str(path)]}})
    pool = prompt_pool(cfg, path)
    assert [p["prompt_ids"] for p in pool] == [[1, 2, 3, 9], [1, 5, 6, 7, 9], [1, 4, 8]]
    assert len({p["prompt_id"] for p in pool}) == 3
    assert "prompt_messages" not in pool[0]  # prepared by an earlier version: not there


def test_the_pool_carries_each_prompts_conversation_for_a_reward_model(tmp_path):
    rows = [{"prompt_text": "List three fruits.", "prompt_ids": [1, 2, 3, 9],
             "prompt_messages": '[{"role": "user", "content": "Hi"}, {"role": "assistant", '
                                '"content": "Hello"}, {"role": "user", "content": "List three fruits."}]'},
            {"prompt_text": "Name two metals.", "prompt_ids": [1, 4, 8],
             "prompt_messages": '[{"role": "user", "content": "Name two metals."}]'}]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = parse_config({"run_dir": str(tmp_path / "run"), "model": {"policy": str(tmp_path)},
                        "data": {"train": [str(path)]}})
    assert [p["prompt_messages"] for p in prompt_pool(cfg, path)] == [r["prompt_messages"]
                                                                     for r in rows]


def test_prompts_from_rounds_prompts_carry_their_text_and_conversation(tmp_path, toy_world):
    import json

    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Name two metals."}]
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "List three fruits."}]), path)
    chat_path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "b", "messages": chat}]), chat_path)
    cfg = parse_config({"run_dir": str(tmp_path / "run"), "model": {"policy": str(toy_world.model_dir)},
                        "data": {"train": [str(toy_world.train_path)], "system_prompt": "Be brief."},
                        "rounds": {"count": 2, "mode": "online",
                                   "prompts": [str(path), str(chat_path)]},
                        "reward": {"kind": "function",
                                   "function": "pipeline.toy.reward:toy_gold_rewards"}})
    pool = prompt_pool(cfg, None)
    assert [p["prompt_text"] for p in pool] == ["List three fruits.", "Name two metals."]
    assert [json.loads(p["prompt_messages"]) for p in pool] == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "List three fruits."}],
        [{"role": "system", "content": "Be brief."}, *chat]]
    assert all(p["prompt_ids"] for p in pool)
