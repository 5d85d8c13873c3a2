"""One real offline round on a local Ray cluster: Ray Data prepare → vLLM reference pool →
Ray Train + DeepSpeed ZeRO-3 (2 workers) → HF checkpoint → evaluate with vLLM samples: the
session's round run by `rayalign run` (cli_round), which the console and tracking tests read
too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.integration.cli_run import copy_stages
from tests.integration.hf_logps import REF_TOLERANCE, hf_response_logps

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def round_run(ray_cluster, cli_round, make_config, tmp_path_factory):
    """The session's offline round (`rayalign run`, cli_round), copied: these tests run the
    pipeline, `rayalign eval` and `export` on it again, which must not touch what the
    console and tracking tests read. (config of the copy, its run dir)"""
    run_dir = copy_stages(cli_round[1], tmp_path_factory.mktemp("round") / "run")
    cfg = make_config(run_dir)  # the same stages' config; no trackers, the session's cluster
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return cfg, run_dir


def manifest(run_dir, stage):
    return json.loads((run_dir / "round-0" / stage / "manifest.json").read_text())


def test_round_writes_every_stage(round_run):
    _cfg, run_dir = round_run
    for stage in ("prepare", "reference", "train", "evaluate"):
        m = manifest(run_dir, stage)
        assert m["stage"] == stage and m["key"]
        assert not (run_dir / "round-0" / f"{stage}.tmp").exists()
    prep = manifest(run_dir, "prepare")["outputs"]
    assert prep["train_stats"]["pairs"] + prep["train_stats"]["quarantined"] == 64
    pairs = pq.read_table(run_dir / "round-0" / "prepare" / "train" / "pairs.parquet")
    assert {"prompt_ids", "chosen_ids", "rejected_ids", "source_file", "source_row"} <= set(pairs.column_names)
    train = manifest(run_dir, "train")["outputs"]
    assert train["optimizer_steps"] == train["num_pairs"] // 16
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, train["optimizer_steps"] + 1))
    assert all("principled/target_mean" in r and r["loss"] is not None for r in steps)
    ev = manifest(run_dir, "evaluate")["outputs"]["metrics"]
    for key in ("eval/rewards/accuracies", "eval/ranking/accuracy", "eval/kl", "eval/win_rate",
                "eval/gold_policy", "eval/gold_reference"):
        assert key in ev
    assert (run_dir / "plots" / "train.png").is_file()


def test_engines_start_once_per_pool(round_run):
    """The run's engines live for the run: one start per engine actor (the reference pool
    serves the reference stage and the evaluation's reference, the policy pool the trained
    policy), none restarted, every start and update a `lifecycle` row; the summary counts them."""
    _cfg, run_dir = round_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r["kind"] == "lifecycle"]
    starts = [(e["pool"], e["stage"]) for e in events if e["event"] == "engine_start"]
    assert sorted(starts) == [("policy-0", "evaluate"), ("reference-0", "reference")]
    assert not [e for e in events if e["event"] == "engine_start" and e["restarted"]]
    assert all(e["seconds"] > 0 for e in events)


def test_checkpoint_loads_in_hf_and_generates(round_run, toy_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir = round_run
    model_dir = run_dir / "round-0" / "train" / "model"
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pt"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(toy_world.model_dir, dtype=torch.float32)
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), start.parameters()))
    assert moved > 0, "training did not change the weights"
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "List three fruits."}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_checkpoint_loaded_by_vllm(round_run, toy_world):
    """A vLLM engine on the exported checkpoint gives the log-probs a float32 HF forward
    gives on the trained weights (and not those of the initial weights, which the
    training moved further than the tolerance), and the evaluate stage sampled from it."""
    import ray
    from transformers import AutoModelForCausalLM

    from workers.vllm_pool import Engine

    cfg, run_dir = round_run
    samples = pq.read_table(run_dir / "round-0" / "evaluate" / "samples.parquet").to_pylist()
    assert len(samples) == 16
    assert sum(bool(s["policy_response"].strip()) for s in samples) >= 12
    model_dir = run_dir / "round-0" / "train" / "model"
    rows = pq.read_table(manifest(run_dir, "reference")["outputs"]["eval"]).to_pylist()
    prompts = [r["prompt_ids"] for r in rows for _ in (0, 1)]
    responses = [r[f"{side}_ids"] for r in rows for side in ("chosen", "rejected")]
    engine = ray.remote(num_cpus=1)(Engine).remote(str(model_dir), cfg.reference.engine.model_dump())
    try:
        vllm = [sum(x) for x in ray.get(engine.sequence_logprobs.remote(prompts, responses))]
    finally:
        ray.kill(engine)
    trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    start = AutoModelForCausalLM.from_pretrained(toy_world.model_dir, dtype=torch.float32).eval()
    hf = [hf_response_logps(trained, p, r) for p, r in zip(prompts, responses)]
    hf_start = [hf_response_logps(start, p, r) for p, r in zip(prompts, responses)]
    gaps = [abs(a - b) for a, b in zip(vllm, hf)]
    moved = max(abs(a - b) for a, b in zip(hf, hf_start))
    print(f"exported checkpoint, vLLM vs HF fp32 summed log-prob gap: max {max(gaps):.2e} over"
          f" {len(gaps)} sequences; training moved them by up to {moved:.2e}")
    assert moved > 10 * REF_TOLERANCE, "training barely moved the log-probs: the check is blind"
    assert max(gaps) < REF_TOLERANCE


def test_reference_logprobs_match_hf_fp32(round_run, toy_world):
    from transformers import AutoModelForCausalLM

    _, run_dir = round_run
    ref_dir = manifest(run_dir, "reference")["outputs"]["eval"]
    rows = pq.read_table(ref_dir).to_pylist()
    model = AutoModelForCausalLM.from_pretrained(toy_world.model_dir, dtype=torch.float32).eval()
    gaps = []
    for row in rows:
        for side in ("chosen", "rejected"):
            hf = hf_response_logps(model, row["prompt_ids"], row[f"{side}_ids"])
            gaps.append(abs(hf - row[f"ref_{side}_logp"]))
            assert row[f"{side}_len"] == len(row[f"{side}_ids"])
    print(f"vLLM vs HF fp32 summed log-prob gap: max {max(gaps):.2e}, mean {sum(gaps)/len(gaps):.2e}"
          f" over {len(gaps)} sequences")
    assert max(gaps) < REF_TOLERANCE


def test_rerun_skips_every_stage(round_run, capsys):
    from pipeline.dag import run_pipeline

    cfg, run_dir = round_run
    before = {s: manifest(run_dir, s)["finished_at"] for s in ("prepare", "reference", "train", "evaluate")}
    assert run_pipeline(cfg) == 0
    after = {s: manifest(run_dir, s)["finished_at"] for s in before}
    assert before == after
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 4


def test_zero3_workers_lower_the_loss_on_a_fixed_batch(round_run, make_config, tmp_path):
    """2 ZeRO-3 workers, the reference stage's real log-probs, one global batch of 16 pairs
    seen three times at lr 1e-3: the loss falls. (That 2 workers take the same steps as 1:
    test_train_robustness's ranks-with-different-batches tests.)"""
    from tests.integration.train_run import train

    _cfg, run_dir = round_run
    ref_train = manifest(run_dir, "reference")["outputs"]["train"]
    subset = tmp_path / "subset"
    subset.mkdir()
    pq.write_table(pq.read_table(ref_train).slice(0, 16), subset / "part.parquet")
    c = make_config(tmp_path / "w2", loss={"name": "sigmoid", "params": {}},
                    train={"num_workers": 2, "micro_batch_size": 4, "global_batch_size": 16,
                           "epochs": 3, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                           "lr_schedule": "constant"})
    result, rows, _ = train(c, subset, tmp_path)
    assert result["optimizer_steps"] == 3
    curve = [r["loss"] for r in rows]
    print(f"loss curve: {curve}")
    assert len(curve) == 3
    assert curve[-1] < curve[0], "loss should fall at lr 1e-3 on a fixed batch"


def all_actor_ids() -> set[str]:
    """Every actor the cluster has started (alive or dead), from the GCS."""
    from ray._private.state import actors

    return set(actors())


def test_reference_cache_hit_and_miss(round_run, make_config, tmp_path, capsys):
    """A second run with the same reference model and data (another run_dir) takes the
    reference log-probs from the cache, the same files, and starts no engine actor; a
    changed length setting gives another key, which the cache does not hold."""
    from pipeline.cluster import worker_env
    from pipeline.dag import OFFLINE_ROUND, Round, _reference_inputs, run_stages
    from pipeline.manifest import Manifest
    from pipeline.preflight import with_absolute_paths
    from pipeline.stages.reference import cache_key

    cfg, run_dir = round_run
    first = manifest(run_dir, "reference")

    def prepared_round(name, **sections):
        c = with_absolute_paths(make_config(tmp_path / name, **sections))
        r = Round(c, tmp_path / name, 0, c.model.policy, c.model.reference_path, worker_env(c))
        run_stages(r, OFFLINE_ROUND[:1])  # prepare, for real: the reference key reads it
        return r

    again = prepared_round("again")
    before = all_actor_ids()
    run_stages(again, OFFLINE_ROUND[1:2])
    assert all_actor_ids() == before, "the reference stage started actors on a cache hit"
    assert re.search(r"train \d+ from cache, eval \d+ from cache", capsys.readouterr().out)
    second = again.done["reference"]
    assert second.inputs["cache_keys"] == first["inputs"]["cache_keys"]
    assert second.outputs["cache_hit"] is True
    assert {s: second.outputs[s] for s in ("train", "eval")} == \
        {s: first["outputs"][s] for s in ("train", "eval")}

    shorter = prepared_round("shorter", data={"max_response_tokens": 48})
    keys = _reference_inputs(shorter)["cache_keys"]
    for split, key in keys.items():
        assert key != first["inputs"]["cache_keys"][split]
        assert Manifest.read(Path(cfg.reference.cache_dir) / key) is None  # a miss: computed anew
    # the length settings are part of the key even for the same prepared data
    lengths = {"prompt": 64, "response": 64, "truncation": "keep_end"}
    same = cache_key(cfg.model.reference_path, cfg.model.tokenizer_path, "data", lengths, "float32")
    assert same != cache_key(cfg.model.reference_path, cfg.model.tokenizer_path, "data",
                             {**lengths, "response": 48}, "float32")


def test_export_writes_the_trained_round_as_a_clean_hf_dir(round_run, tmp_path):
    """`rayalign export RUN_DIR --round 0 OUT`: the round's weights, loadable by HF and vLLM."""
    import ray
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.cli import main
    from workers.vllm_pool import Engine

    cfg, run_dir = round_run
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--round", "0", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json",
            "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".py")) or "manifest" in n
                or "rayalign" in n or n.startswith(("checkpoint", "."))]
    trained = run_dir / "round-0" / "train" / "model"
    ours, theirs = load_file(out / "model.safetensors"), load_file(trained / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for (name, a), b in zip(model.state_dict().items(), AutoModelForCausalLM.from_pretrained(
            trained, dtype=torch.float32).state_dict().values()):
        assert torch.equal(a, b), name
    # vLLM loads it: the summed log-prob of a held-out response matches HF's fp32 forward
    row = pq.read_table(manifest(run_dir, "reference")["outputs"]["eval"]).to_pylist()[0]
    engine = ray.remote(Engine).remote(str(out), cfg.sampling.engine.model_dump(), False, 0)
    [vllm_tokens] = ray.get(engine.sequence_logprobs.remote([row["prompt_ids"]],
                                                            [row["chosen_ids"]]))
    ray.kill(engine)
    ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    hf = logp.gather(-1, ids[0, 1:, None])[len(row["prompt_ids"]) - 1:, 0].sum().item()
    assert abs(sum(vllm_tokens) - hf) < REF_TOLERANCE
    assert main(["export", str(run_dir), "--round", "0", str(out)]) == 2  # never overwritten


def test_eval_command_reproduces_the_rounds_evaluation(round_run, capsys):
    """`rayalign eval RUN_DIR --round 0`: the run's own evaluate stage, redone in a round of
    its own under RUN_DIR/eval (eval split prepared and scored afresh), gives its numbers."""
    from pipeline.cli import main

    _, run_dir = round_run
    assert main(["eval", str(run_dir), "--round", "0"]) == 0
    out = capsys.readouterr().out
    assert "pairs trained" in out and "win_rate" in out  # the run's evaluation table
    ours = json.loads((run_dir / "eval" / "round-0" / "evaluate" / "manifest.json").read_text())
    theirs = manifest(run_dir, "evaluate")["outputs"]["metrics"]
    ours = ours["outputs"]["metrics"]
    assert ours.keys() == theirs.keys()
    print({k: (ours[k], theirs[k]) for k in ours})
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], rel=1e-4, abs=1e-4), k
    assert not (run_dir / "eval" / "round-0" / "train").exists()  # nothing retrained


def test_eval_command_on_a_model_with_a_config(round_run, toy_world, tmp_path):
    """`rayalign eval MODEL --config C`: the initial policy against itself (the reference):
    same seed, same samples, so no gold difference, win rate 1/2, KL 0."""
    from pipeline.cli import main

    _, run_dir = round_run
    out = tmp_path / "eval-initial"
    assert main(["eval", str(toy_world.model_dir), "--config", str(run_dir / "config.yaml"),
                 "--out", str(out), "eval.num_prompts=8"]) == 0
    metrics = json.loads((out / "round-0" / "evaluate" / "manifest.json").read_text())
    metrics = metrics["outputs"]["metrics"]
    samples = pq.read_table(out / "round-0" / "evaluate" / "samples.parquet").to_pylist()
    assert len(samples) == 8  # the override reached the evaluation
    assert metrics["eval/gold_policy"] == pytest.approx(metrics["eval/gold_reference"])
    assert metrics["eval/win_rate"] == pytest.approx(0.5)
    assert abs(metrics["eval/kl"]) < 1e-3
    assert main(["eval", str(toy_world.model_dir), "--out", str(out)]) == 2  # no config
