"""Two rounds on the toy world: an offline round, then an online round that samples the
round-0 policy with vLLM, scores with the gold reward, pairs and trains against round 0's
policy as reference (`rounds.reference: previous`); the driver is killed in the middle of
round 1's training, after a checkpoint, and the run resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_rounds(ray_cluster, make_config, tmp_path_factory):
    """Two rounds whose driver is killed (SIGKILL) during round 1's training once it has
    saved a checkpoint, then resumed with `rayalign resume`: (config, run_dir, the resume's
    console output, stage manifests as they were when the driver died)."""
    import ray

    from pipeline.dag import console, resume_pipeline

    run_dir = tmp_path_factory.mktemp("rounds") / "run"
    cfg = make_config(run_dir, rounds={"count": 2, "mode": "online", "prompts_per_round": PROMPTS,
                                       "pair_rule": "best_vs_worst", "min_margin": 0.01,
                                       "reference": "previous"},
                      sampling={"n": N}, eval={"num_prompts": 8},
                      train={"num_workers": 2, "micro_batch_size": 2, "global_batch_size": 4,
                             "checkpoint_every": 2, "weight_transfer": "object_store"})
    config = run_dir.parent / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    address = ray.get_runtime_context().gcs_address
    with open(run_dir.parent / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config),
                                   "--ray-address", address], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        killed = wait_then_kill(driver, run_dir / "ray_train", timeout=1200)
    assert killed, (f"the driver ended before round 1 saved a training checkpoint: see"
                    f" {run_dir.parent / 'driver.log'}")
    at_kill = {(k, s): manifest(run_dir, k, s) for k in (0, 1) for s in STAGES[k]
               if (run_dir / f"round-{k}" / s / "manifest.json").exists()}
    with console.capture() as captured:
        assert resume_pipeline(run_dir) == 0
    return cfg, run_dir, captured.get(), at_kill


STAGES = {0: ("prepare", "reference", "train", "evaluate"),
          1: ("sample", "score", "pair", "reference", "train", "evaluate")}


PROMPTS, N = 32, 4  # round 1: prompts sampled, samples per prompt


def wait_then_kill(driver: subprocess.Popen, storage: Path, timeout: float) -> bool:
    """SIGKILL the driver's process group once Ray Train has registered a round-1 checkpoint
    of the run's trainer under `storage` (its controller writes the snapshot then)."""
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        if any("checkpoint-round-1-step-" in p.read_text()
               for p in storage.glob("*/checkpoint_manager_snapshot.json")):
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
            return True
        time.sleep(0.2)
    if driver.poll() is None:
        os.killpg(driver.pid, signal.SIGKILL)
    return False


def manifest(run_dir, k, stage):
    return json.loads((run_dir / f"round-{k}" / stage / "manifest.json").read_text())


def test_round_1_samples_the_round_0_policy(two_rounds):
    from pipeline.manifest import model_digest
    from pipeline.stages.sample import prompt_pool, round_prompts

    run_dir = two_rounds[1]
    trained = run_dir / "round-0" / "train" / "model"
    sample = manifest(run_dir, 1, "sample")
    assert sample["outputs"]["policy_path"] == str(trained)
    assert sample["outputs"]["policy_digest"] == model_digest(str(trained))
    assert sample["inputs"]["policy"] == model_digest(str(trained))
    # what the sample stage wrote: the round's slice of the prompt pool, N samples each
    cfg = two_rounds[0]
    pool = prompt_pool(cfg, run_dir / "round-0" / "prepare" / "train" / "pairs.parquet")
    expected = {p["prompt_id"]: p["prompt_ids"] for p in round_prompts(pool, cfg, 1)}
    assert len(expected) == PROMPTS
    samples = pq.read_table(run_dir / "round-1" / "sample" / "samples").to_pylist()
    per_prompt: dict[str, list[int]] = {}
    for row in samples:
        assert row["prompt_ids"] == expected[row["prompt_id"]]
        per_prompt.setdefault(row["prompt_id"], []).append(row["sample_index"])
    assert set(per_prompt) == set(expected)
    assert all(sorted(v) == list(range(N)) for v in per_prompt.values())
    assert sample["outputs"]["rows"] == len(samples) == PROMPTS * N
    scored = pq.read_table(run_dir / "round-1" / "score" / "scored").to_pylist()
    assert len(scored) == len(samples) and all(0.0 <= r["score"] <= 2.0 for r in scored)
    pairs = pq.read_table(run_dir / "round-1" / "pair" / "pairs.parquet").to_pylist()
    counts = manifest(run_dir, 1, "pair")["outputs"]["counts"]
    assert counts["pairs"] == len(pairs) > 0 and counts["prompts"] == PROMPTS
    assert all(p["chosen_score"] - p["rejected_score"] > 0.01 for p in pairs)
    assert all(p["chosen_winrate"] > p["rejected_winrate"] for p in pairs)
    assert not (run_dir / "round-1" / "prepare").exists()  # prepare runs once, in round 0


def test_metrics_across_rounds(two_rounds):
    run_dir = two_rounds[1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["round"] for r in evals] == [0, 1]
    assert all("eval/gold_policy" in r and "eval/kl" in r for r in evals)
    assert {r["round"] for r in rows if r["kind"] == "train"} == {0, 1}
    assert (run_dir / "plots" / "eval.png").is_file()
    # the reference's samples of the eval prompts are sampled once (here, or by an earlier
    # run on the same reference, prompts and settings) and read back every round after
    cfg = two_rounds[0]
    assert list((Path(cfg.reference.cache_dir) / "eval-samples").glob("*.parquet"))
    first, second = (pq.read_table(run_dir / f"round-{k}" / "evaluate" / "samples.parquet")
                     .column("reference_response").to_pylist() for k in (0, 1))
    assert first == second and len(first) == 8
    # round 1's reference (the round-0 policy) came from the trainer's memory, not from disk
    updates = [r for r in rows if r.get("event") == "weight_update"]
    pushed = [r for r in updates if r["via"] == "object_store"]
    assert any(r["round"] == 1 and r["stage"] == "reference" for r in pushed), updates
    size = (run_dir / "round-0" / "train" / "model" / "model.safetensors").stat().st_size
    assert all(0 < size - r["bytes"] < 64_000 for r in pushed)  # the tensors: the file less its header


def test_round_0s_evaluation_ran_beside_round_1_up_to_its_reference(two_rounds):
    """pipeline.dag.BESIDE_EVALUATION: round 0's evaluation runs while round 1 samples,
    scores and pairs; with `rounds.reference: previous` round 1's reference stage (which loads
    round 0's policy into the reference engines) starts after it. (That the two run at once
    is shown without timings by tests/unit/pipeline/test_rounds_beside.py.)"""
    _, run_dir, _, at_kill = two_rounds
    log = (run_dir.parent / "driver.log").read_text()
    assert "round 0 evaluate: runs beside round 1" in log, log
    start = lambda m: m["finished_at"] - m["seconds"]
    assert start(at_kill[(1, "reference")]) >= at_kill[(0, "evaluate")]["finished_at"]


def test_killed_driver_resumes_from_the_last_finished_stage(two_rounds):
    _, run_dir, out, at_kill = two_rounds
    finished = {(k, s) for k in (0, 1) for s in STAGES[k][:4]}  # round 1: up to reference
    assert finished <= set(at_kill)
    assert (1, "train") not in at_kill  # the killed stage was never taken as done
    assert out.count("up to date, skipped") == 8
    ran = [line for line in out.splitlines() if "up to date" not in line]
    assert any("round 1 train" in line for line in ran), out  # redone, not skipped
    assert any("round 1 evaluate" in line for line in ran), out
    for k, s in finished:  # not redone
        assert manifest(run_dir, k, s)["finished_at"] == at_kill[(k, s)]["finished_at"]
    steps = manifest(run_dir, 1, "train")["outputs"]["optimizer_steps"]
    # the resumed training continued from the killed driver's last checkpoint, not step 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train" and r["round"] == 1]
    resumed = {r["resumed_from"] for r in train} - {0}
    print(f"round 1: {steps} steps; rows (step, resumed_from):"
          f" {[(r['step'], r['resumed_from']) for r in train]}")
    assert len(resumed) == 1, "the resumed run did not start from a training checkpoint"
    start = resumed.pop()
    assert 0 < start < steps and start % 2 == 0  # train.checkpoint_every: 2
    after = [r["step"] for r in train if r["resumed_from"] == start]
    assert after == list(range(start + 1, steps + 1))
    leftovers = [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name]
    assert not leftovers, leftovers
    assert not (run_dir / "ray_train" / "trainer").exists(), "resumable train state left behind"
    starts = [r for r in rows if r["kind"] == "lifecycle" and r["event"] == "trainer_start"]
    assert [r["attempt"] for r in starts] == [1, 1]  # the killed driver's group, the resumed one


def test_reference_previous_is_the_last_rounds_policy(two_rounds, toy_world):
    """rounds.reference: previous: round 1's reference log-probs are those of round 0's
    exported policy (a float32 HF forward on it), not those of the initial model."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.integration.hf_logps import REF_TOLERANCE, hf_response_logps

    run_dir = two_rounds[1]
    rows = pq.read_table(manifest(run_dir, 1, "reference")["outputs"]["eval"]).to_pylist()
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    previous, initial = load(run_dir / "round-0" / "train" / "model"), load(toy_world.model_dir)
    to_previous, to_initial = [], []
    for row in rows:
        for side in ("chosen", "rejected"):
            ref = row[f"ref_{side}_logp"]
            to_previous.append(abs(ref - hf_response_logps(previous, row["prompt_ids"], row[f"{side}_ids"])))
            to_initial.append(abs(ref - hf_response_logps(initial, row["prompt_ids"], row[f"{side}_ids"])))
    print(f"round 1 reference vs round-0 policy: max gap {max(to_previous):.2e};"
          f" vs the initial model: max gap {max(to_initial):.2e}")
    assert max(to_previous) < REF_TOLERANCE
    assert max(to_initial) > 10 * REF_TOLERANCE


def test_sampling_is_reproducible_with_a_seed(ray_cluster, toy_world):
    import ray

    from workers.vllm_pool import Engine

    engine = ray.remote(num_cpus=1)(Engine).remote(
        str(toy_world.model_dir), {"dtype": "float32", "max_model_len": 256}, False, 0)
    prompts = [[151, 9, 33, 7], [151, 12, 40]]
    kw = {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 16}
    a, b, c = ray.get([engine.sample.remote(prompts, seed=s, **kw) for s in (7, 7, 8)])
    ray.kill(engine)
    ids = lambda out: [[sample[0] for sample in per_prompt] for per_prompt in out]
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
