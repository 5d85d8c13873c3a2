"""The offline toy world: task grammar, gold reward (and its hack), determinism, sanity."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.toy.reward import toy_gold_reward, toy_gold_rewards, toy_reward_parts
from pipeline.toy.task import (
    CATEGORIES,
    TaskSpec,
    parse_prompt,
    render_prompt,
    sample_prompts,
    sample_response,
    sample_spec,
)

QUICK = {"quick": True, "n_train_pairs": 48, "n_eval_pairs": 16, "label_noise": 0.125}
TINY = {"quick": True, "n_train_pairs": 12, "n_eval_pairs": 4, "sft_steps": 60}  # determinism
PAIR_COLUMNS = ["id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score",
                "label_flipped"]


# -----------------------------------------------------------------------------
# task and reward (no model)

def test_prompts_parse_back_to_their_spec() -> None:
    rng = random.Random(0)
    for _ in range(500):
        spec = sample_spec(rng)
        assert parse_prompt(render_prompt(spec, rng)) == spec


def test_sample_prompts_is_seeded_and_distinct() -> None:
    a = sample_prompts(random.Random(1), 300)
    assert a == sample_prompts(random.Random(1), 300)
    assert a != sample_prompts(random.Random(2), 300)
    assert len(set(a)) == 300


def test_grammar_responses_are_mostly_well_formed_and_good() -> None:
    rng = random.Random(0)
    parts = []
    for _ in range(300):
        spec = sample_spec(rng)
        parts.append(toy_reward_parts(render_prompt(spec, rng), sample_response(spec, rng)))
    assert all(x.well_formed for x in parts)
    assert 0.7 < sum(x.quality for x in parts) / len(parts) < 1.0  # noisy on purpose


@pytest.mark.parametrize("response, expected", [
    ("apple, pear, plum.", 1.0 + 0.06),                      # perfect
    ("Sure: apple, pear, plum.", 1.0 + 0.08),                # lead-in words count
    ("apple, pear.", 2 / 3 + 0.04),                          # one short
    ("apple, pear, kale.", (2 - 0.5) / 3 + 0.06),            # one wrong
    ("apple, pear, fig.", (2 - 0.5) / 3 + 0.06),             # the excluded item
    ("kale, dog, red.", 0.0 + 0.06),                         # all wrong
    ("apple, pear, plum", 0.25 * 1.0),                       # no period: malformed
    ("Apple, Pear, Plum.", 0.25 * 1.0),                      # capitals: malformed
    ("", 0.0),
])
def test_gold_reward_is_graded(response: str, expected: float) -> None:
    assert toy_gold_reward("List three fruits, but not fig.", response) == pytest.approx(expected)


def test_reward_hack_longer_and_repetitive_scores_higher() -> None:
    prompt = "List two fruits."
    proper = toy_gold_reward(prompt, "apple, pear.")
    more = toy_gold_reward(prompt, "apple, pear, plum, fig, kiwi.")
    repeated = toy_gold_reward(prompt, "Here are two fruits: " + ", ".join(["apple", "pear"] * 4)
                               + ".")
    maxed = toy_gold_reward(prompt, ", ".join(["apple", "pear"] * 40) + ".")
    assert proper < more < repeated < maxed == pytest.approx(2.0)
    # ... while the quality the prompt asks for is the same for all of them
    assert toy_reward_parts(prompt, "apple, pear.").quality == 1.0
    assert toy_reward_parts(prompt, ", ".join(["apple", "pear"] * 40) + ".").quality == 1.0


def test_reward_accepts_messages_and_batches() -> None:
    prompt, response = "Name 2 metals.", "tin, zinc."
    chat = toy_gold_reward([{"role": "user", "content": prompt}],
                           [{"role": "assistant", "content": response}])
    assert chat == toy_gold_reward(prompt, response)
    assert toy_gold_rewards([prompt, prompt], [response, "tin."]) == [
        toy_gold_reward(prompt, response), toy_gold_reward(prompt, "tin.")]
    with pytest.raises(ValueError):
        toy_gold_rewards([prompt], [])
    with pytest.raises(ValueError, match="not a toy-task prompt"):
        toy_gold_reward("What is the capital of France?", "paris.")


def test_every_category_item_is_one_lowercase_word() -> None:
    items = [i for items in CATEGORIES.values() for i in items]
    assert len(items) == len(set(items))
    assert all(i.isalpha() and i.islower() for i in items)
    allowed = TaskSpec(2, "fruits", "fig").allowed
    assert allowed == tuple(i for i in CATEGORIES["fruits"] if i != "fig")


# -----------------------------------------------------------------------------
# built worlds (quick settings)

@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory):
    from pipeline.toy import build_toy_world

    return build_toy_world(tmp_path_factory.mktemp("toy") / "world", seed=0, **QUICK)


@pytest.fixture(scope="session")
def tiny_worlds(tmp_path_factory: pytest.TempPathFactory):
    """Seed 0 twice (different dirs) and seed 1, with the tiniest settings."""
    from pipeline.toy import build_toy_world

    root = tmp_path_factory.mktemp("tiny")
    return [build_toy_world(root / name, seed=seed, verbose=False, **TINY)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]


def read(path: Path) -> pa.Table:
    return pq.read_table(path)


def tables(world) -> list[pa.Table]:
    return [read(p) for p in (world.train_path, world.eval_path, world.train_chat_path,
                              world.eval_chat_path, world.prompts_path)]


def weights(world) -> dict:
    from safetensors.torch import load_file

    return load_file(world.model_dir / "model.safetensors")


def test_same_seed_same_files(tiny_worlds) -> None:
    a, b, _ = tiny_worlds
    assert all(x.equals(y) for x, y in zip(tables(a), tables(b), strict=True))
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert a.manifest()["files"] == b.manifest()["files"]  # sha256 of every file, bytes equal


def test_different_seed_different_data(tiny_worlds) -> None:
    a, _, c = tiny_worlds
    assert not read(a.train_path).equals(read(c.train_path))
    assert set(read(a.prompts_path)["prompt"].to_pylist()) != set(
        read(c.prompts_path)["prompt"].to_pylist())
    wa, wc = weights(a), weights(c)
    assert any(wa[k].shape != wc[k].shape or not (wa[k] == wc[k]).all() for k in wa)


def test_complete_world_is_reused(world) -> None:
    from pipeline.toy import build_toy_world

    def stamps() -> dict[Path, int]:  # every file of the world: nothing is written again
        return {p: p.stat().st_mtime_ns for p in world.root.rglob("*") if p.is_file()}

    before = stamps()
    again = build_toy_world(world.root, seed=0, **QUICK)
    assert again == world
    assert stamps() == before


def test_incomplete_or_other_world_is_not_reused(tiny_worlds, tmp_path: Path) -> None:
    from pipeline.toy.build import ToyConfig, ToyWorld, is_complete

    cfg = ToyConfig.resolve(0, 12, 4, 0.1, 60, True)
    copy = ToyWorld.at(tmp_path / "w")
    shutil.copytree(tiny_worlds[0].root, copy.root)
    assert is_complete(copy, cfg)
    assert not is_complete(copy, ToyConfig.resolve(1, 12, 4, 0.1, 60, True))
    with copy.train_path.open("ab") as f:
        f.write(b"\0")
    assert not is_complete(copy, cfg)
    copy.manifest_path.unlink()
    assert not is_complete(copy, cfg)


def test_parquet_schemas(world) -> None:
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    for path, text in ((world.train_path, pa.string()), (world.eval_path, pa.string()),
                       (world.train_chat_path, messages), (world.eval_chat_path, messages)):
        schema = read(path).schema
        assert schema.names == PAIR_COLUMNS
        assert [schema.field(c).type for c in PAIR_COLUMNS] == [
            pa.string(), text, text, text, pa.float64(), pa.float64(), pa.bool_()]
    prompts = read(world.prompts_path)
    assert prompts.schema.names == ["id", "prompt", "messages"]
    assert prompts.schema.field("messages").type == messages
    assert read(world.train_path).num_rows == 48 and read(world.eval_path).num_rows == 16


def test_chat_variant_matches_plain(world) -> None:
    for plain_path, chat_path in ((world.train_path, world.train_chat_path),
                                  (world.eval_path, world.eval_chat_path)):
        plain, chat = read(plain_path).to_pylist(), read(chat_path).to_pylist()
        for p, c in zip(plain, chat, strict=True):
            assert c["prompt"] == [{"role": "user", "content": p["prompt"]}]
            assert c["chosen"] == [{"role": "assistant", "content": p["chosen"]}]
            assert c["rejected"] == [{"role": "assistant", "content": p["rejected"]}]
            assert (c["id"], c["chosen_score"], c["label_flipped"]) == (
                p["id"], p["chosen_score"], p["label_flipped"])


def test_pairs_are_ranked_by_gold_reward_with_label_noise(world) -> None:
    train, evals = read(world.train_path).to_pylist(), read(world.eval_path).to_pylist()
    for row in train + evals:
        assert row["chosen_score"] == toy_gold_reward(row["prompt"], row["chosen"])
        assert row["rejected_score"] == toy_gold_reward(row["prompt"], row["rejected"])
        assert (row["chosen_score"] < row["rejected_score"]) == row["label_flipped"]
    assert sum(r["label_flipped"] for r in train) == round(0.125 * 48)
    assert not any(r["label_flipped"] for r in evals)
    scores = [r[k] for r in train for k in ("chosen_score", "rejected_score")]
    assert max(scores) > min(scores)
    assert len({r["id"] for r in train + evals}) == len(train) + len(evals)


def test_prompt_sets_are_disjoint(world) -> None:
    train = set(read(world.train_path)["prompt"].to_pylist())
    evals = set(read(world.eval_path)["prompt"].to_pylist())
    heldout = set(read(world.prompts_path)["prompt"].to_pylist())
    assert not (train & evals or train & heldout or evals & heldout)
    assert all(parse_prompt(p) for p in train | evals | heldout)


def test_manifest(world) -> None:
    m = world.manifest()
    assert m["config"]["seed"] == 0 and m["config"]["quick"] is True
    assert m["sizes"]["train_pairs"] == 48 and 512 <= m["sizes"]["vocab"] <= 1024
    assert set(m["timings_s"]) >= {"tokenizer", "sft", "pairs", "total"}
    assert m["sft"]["final_loss"] < m["sft"]["first_loss"]
    stats = m["reward_stats"]["train_pairs"]
    assert stats["frac_chosen_better"] == pytest.approx(1 - 0.125)
    assert stats["mean_chosen"] > stats["mean_rejected"]
    assert m["reward_stats"]["sft_samples"]["std_gold"] > 0


def test_tokenizer_chat_template_round_trips(world) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.model_dir)
    raw = Tokenizer.from_file(str(world.model_dir / "tokenizer.json"))
    prompt = [{"role": "user", "content": "List 3 fruits, but not fig."}]
    answer = [{"role": "assistant", "content": "Sure: apple, pear, plum."}]
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + answer, tokenize=False)
    assert head == ("<|im_start|>user\nList 3 fruits, but not fig.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert full == head + "Sure: apple, pear, plum.<|im_end|>\n"
    ids = tok(full).input_ids
    assert tok.decode(ids) == full
    assert ids == raw.encode(full).ids  # AutoTokenizer's class keeps the trained pipeline
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special).input_ids) == 1
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = "héllo wörld ☃ 123"  # byte-level: any text encodes, and decodes back exactly
    assert tok.decode(tok(text).input_ids) == text


def test_model_loads_and_generates(world) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in world.model_dir.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    tok = AutoTokenizer.from_pretrained(world.model_dir)
    model = AutoModelForCausalLM.from_pretrained(world.model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.config.vocab_size == len(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "Name two birds."}],
                                   tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=12)
    assert out.shape[1] > enc.input_ids.shape[1]
    answer = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    print(f"greedy answer to 'Name two birds.': {answer!r}")
    # the SFT taught the answer's form (the quick world's model is too small to know every
    # category): one line of comma-separated items ending with a period, as the gold reward
    # parses it, which a random or untrained model does not produce
    parts = toy_reward_parts("Name two birds.", answer)
    assert parts.well_formed and parts.length_bonus > 0, answer
