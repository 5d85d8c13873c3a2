"""The train stage through Ray Train × DeepSpeed ZeRO-3: faults (a killed worker, NaN/inf
losses; each test injects its fault itself) and packed layouts against the padded one.

The pairs carry made-up reference log-probs (the train stage only reads the columns), so
no vLLM engine is needed here; the data order and step count are checked against the
order the train stage promises (`pipeline.stages.train.order_key`).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.integration.train_run import read_rows, train, train_rounds

pytestmark = pytest.mark.integration

GLOBAL_BATCH = 4


def training_order(table: pa.Table, seed: int = 0) -> list[str]:
    from pipeline.stages.train import order_key

    keys = order_key(table, seed, shuffle=True).to_pylist()
    return [i for _, i in sorted(zip(keys, table["id"].to_pylist()))]


def config(make_config, tmp_path, model=None, **train):
    return make_config(tmp_path / "cfg", **({"model": model} if model else {}),
                       loss={"name": "sigmoid", "params": {"beta": 0.1}},
                       train={"num_workers": 2, "micro_batch_size": 2,
                              "global_batch_size": GLOBAL_BATCH, "learning_rate": 1e-4,
                              "warmup_ratio": 0.0, "lr_schedule": "constant", **train})


def alive_actor_pids(class_name: str) -> list[int]:
    """Pids of the live actors of a class, from the GCS (the test cluster has no dashboard)."""
    from ray._private.state import actors

    return [a["Pid"] for a in actors().values()
            if a["ActorClassName"] == class_name and a["State"] == "ALIVE" and a["Pid"]]


def kill_a_train_worker_past_a_checkpoint(run_storage, metrics, every, killed, timeout=300.0,
                                          round_index=0):
    """SIGKILL one training worker once Ray Train's controller has registered a checkpoint
    of round `round_index` (it writes its snapshot then) and the workers have logged a step
    of that round past it that is not a checkpoint step (`every`): whichever checkpoint the
    group restarts from, registered now or still in flight, is then before the last logged
    step, so some steps are redone."""
    snapshot = run_storage / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        saved = [int(s) for s in re.findall(rf"checkpoint-round-{round_index}-step-(\d+)",
                                            snapshot.read_text())] \
            if snapshot.exists() else []
        logged = [r["step"] for r in read_rows(metrics)
                  if r.get("round") == round_index] if saved else []
        if saved and logged and max(logged) > max(saved) and max(logged) % every:
            pids = alive_actor_pids("RayTrainWorker")
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.update(pid=pids[-1], checkpoint=max(saved), logged=max(logged))
                return
        time.sleep(0.1)


def test_killed_lora_worker_resumes_from_checkpoint(pairs_dir, make_config, tmp_path):
    """SIGKILL one of two ZeRO-3 workers of a LoRA run mid-epoch, in its first round: Ray
    Train restarts the group from the last DeepSpeed checkpoint, which holds the adapters
    and their optimizer state; every step is taken once in the promised data order, and the
    redone steps reproduce the lost attempt's losses (the state was restored exactly).
    Full weights: test_killed_worker_in_round_two_resumes_that_rounds_checkpoint."""
    from pipeline.stages.train import TrainerSession
    from workers.recipe.recipe import batch_digest

    lora = {"r": 8}
    cfg = config(make_config, tmp_path, model={"lora": lora}, epochs=2, checkpoint_every=4,
                 max_failures=2, learning_rate=1e-3)
    killed: dict = {}
    killer = threading.Thread(target=kill_a_train_worker_past_a_checkpoint,
                              args=(tmp_path / "run-storage" / TrainerSession.NAME,
                                    tmp_path / "run-metrics.jsonl", 4, killed), daemon=True)
    killer.start()
    result, rows, out = train(cfg, pairs_dir, tmp_path)
    killer.join(timeout=1)
    assert killed, "the worker was never killed (no checkpoint was registered in time)"
    print(f"killed train worker pid {killed['pid']} after step {killed['logged']}"
          f" (checkpoint at step {killed['checkpoint']})")

    order = training_order(pq.read_table(pairs_dir))
    per_epoch = len(order) // GLOBAL_BATCH
    steps = per_epoch * 2
    assert result["optimizer_steps"] == result["steps_done"] == steps
    expected = {s: batch_digest(order[((s - 1) % per_epoch) * GLOBAL_BATCH:
                                      ((s - 1) % per_epoch + 1) * GLOBAL_BATCH])
                for s in range(1, steps + 1)}
    resumed = [r for r in rows if r["resumed_from"] > 0]
    assert resumed, "no step was reported after a restart"
    restart_step = resumed[0]["resumed_from"]
    assert restart_step % 4 == 0 and restart_step < steps
    first_attempt = {r["step"]: r for r in rows if r["resumed_from"] == 0}
    final = {r["step"]: r for r in rows}  # the last row of each step wins
    assert sorted(final) == list(range(1, steps + 1))
    assert {s: r["batch_digest"] for s, r in final.items()} == expected
    assert restart_step >= killed["checkpoint"]
    redone = [s for s in first_attempt if s > restart_step]
    assert redone, f"no step past the checkpoint at {restart_step} was lost and redone"
    print(f"resumed from step {restart_step}; redone steps {redone}")
    for s in redone:
        assert [r["resumed_from"] for r in rows if r["step"] == s] == [0, restart_step], s
        assert math.isclose(first_attempt[s]["loss"], final[s]["loss"], abs_tol=1e-5), s
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run-storage" / TrainerSession.NAME).exists(), \
        "resumable state left behind"


def halves(pairs_dir, tmp_path):
    """The pairs split in two data sets (one a round)."""
    table = pq.read_table(pairs_dir)
    out = []
    for k in range(2):
        d = tmp_path / f"half-{k}"
        d.mkdir()
        pq.write_table(table.slice(k * table.num_rows // 2, table.num_rows // 2), d / "p.parquet")
        out.append(d)
    return out


def poison(pairs_dir, tmp_path, positions):
    """A copy of the pairs where the pairs at these training-order positions have an
    infinite reference log-prob, so their loss is inf."""
    table = pq.read_table(pairs_dir)
    order = training_order(table)
    bad = {order[p] for p in positions}
    ref = pc.if_else(pc.is_in(table["id"], pa.array(sorted(bad))), math.inf,
                     table["ref_chosen_logp"])
    table = table.set_column(table.schema.get_field_index("ref_chosen_logp"), "ref_chosen_logp", ref)
    out = tmp_path / "poisoned"
    out.mkdir()
    pq.write_table(table, out / "part-0.parquet")
    return out, bad


def test_two_rounds_on_one_fit_match_a_fit_per_round(pairs_dir, make_config, tmp_path):
    """Two rounds on the run's one trainer (the worker group starts once: one trainer_start
    row) take the same steps as a fresh fit per round from the previous round's export: a
    fresh optimizer and LR schedule (warmup, cosine) each round, the same data order, the
    same losses and the same final weights.

    Round 0 has gradient accumulation 2 and a skipped (inf-loss) micro-batch, so its data
    runs out in the middle of its last step: that step is taken from the micro-batch it had,
    and round 1 still aligns. (DeepSpeed counts micro-steps across rounds: a half-accumulated
    step would leak into round 1's first step and shift every step boundary of that round.)"""
    from safetensors.torch import load_file

    first, second = halves(pairs_dir, tmp_path)  # 32 pairs each: 4 steps of 8 pairs
    poisoned, _ = poison(first, tmp_path, positions=[5])  # in the second micro-batch
    datas = [poisoned, second]
    cfg = config(make_config, tmp_path, global_batch_size=8, learning_rate=1e-3,
                 lr_schedule="cosine", warmup_ratio=0.25, on_nonfinite="skip")
    assert cfg.train.grad_accum_steps == 2
    results, path, outs = train_rounds(cfg, datas, tmp_path, "one-fit")
    assert results[0]["nonfinite_skipped"] == 1
    assert [r["steps_done"] for r in results] == [4, 4]
    starts = read_rows(path, "lifecycle")
    print(f"trainer starts: {starts}")
    assert [(r["event"], r["workers"], r["attempt"]) for r in starts] == [("trainer_start", 2, 1)]
    assert starts[0]["seconds"] > 0 and starts[0]["torch_threads"] >= 1
    one_fit = [(r["round"], r["step"], r["loss"], r["lr"]) for r in read_rows(path)]
    per_round, policy = [], None
    for k, data in enumerate(datas):
        _, p, fit_outs = train_rounds(cfg, [data], tmp_path, f"fit-{k}", policy=policy)
        assert len(read_rows(p, "lifecycle")) == 1
        per_round += [(k, r["step"], r["loss"], r["lr"]) for r in read_rows(p)]
        policy = str(fit_outs[0] / "model")
    print(f"one fit: {one_fit}\nper-round fits: {per_round}")
    assert [x[:2] for x in one_fit] == [x[:2] for x in per_round] == [
        (k, s) for k in range(2) for s in (1, 2, 3, 4)]
    for a, b in zip(one_fit, per_round, strict=True):
        assert abs(a[2] - b[2]) < 1e-5 and math.isclose(a[3], b[3]), (a, b)
    assert one_fit[4][3] == one_fit[0][3] != one_fit[3][3]  # the schedule restarted
    mine, theirs = load_file(outs[1] / "model" / "model.safetensors"), load_file(
        Path(policy) / "model.safetensors")
    gap = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    print(f"round-1 weights: max gap {gap:.2e}")
    assert gap < 1e-5


def test_killed_worker_in_round_two_resumes_that_rounds_checkpoint(pairs_dir, make_config,
                                                                   tmp_path):
    """SIGKILL one of two ZeRO-3 workers (full weights) in the second round of one trainer:
    Ray Train restarts the group (a second trainer_start row) from the last DeepSpeed
    checkpoint, of round 1 (not round 0's, not step 0): every step is taken once in the
    promised data order, the redone steps reproduce the lost attempt's losses, round 0 is
    not trained again, and no resumable state is left behind."""
    from pipeline.stages.train import TrainerSession
    from workers.recipe.recipe import batch_digest

    data = halves(pairs_dir, tmp_path)
    cfg = config(make_config, tmp_path, checkpoint_every=2, max_failures=2)
    killed: dict = {}
    killer = threading.Thread(target=kill_a_train_worker_past_a_checkpoint,
                              args=(tmp_path / "two-storage" / TrainerSession.NAME,
                                    tmp_path / "two-metrics.jsonl", 2, killed, 600.0, 1),
                              daemon=True)
    killer.start()
    results, path, outs = train_rounds(cfg, data, tmp_path, "two")
    killer.join(timeout=1)
    assert killed, "the worker was never killed (no round-1 checkpoint was registered in time)"
    print(f"killed {killed}")
    rows = read_rows(path)
    steps = len(training_order(pq.read_table(data[1]))) // GLOBAL_BATCH
    assert [r["steps_done"] for r in results] == [steps, steps]
    round0 = [(r["step"], r["resumed_from"]) for r in rows if r["round"] == 0]
    assert round0 == [(s, 0) for s in range(1, steps + 1)], "round 0 was trained again"
    round1 = [r for r in rows if r["round"] == 1]
    restart = {r["resumed_from"] for r in round1} - {0}
    assert len(restart) == 1
    start = restart.pop()
    assert start % 2 == 0 and start >= 2
    assert start >= killed["checkpoint"]
    order = training_order(pq.read_table(data[1]))
    final = {r["step"]: r for r in round1}
    assert sorted(final) == list(range(1, steps + 1))
    assert {s: r["batch_digest"] for s, r in final.items()} == {
        s: batch_digest(order[(s - 1) * GLOBAL_BATCH:s * GLOBAL_BATCH]) for s in final}
    first = {r["step"]: r["loss"] for r in round1 if r["resumed_from"] == 0}
    assert any(s > start for s in first), f"no step past the checkpoint at {start} was redone"
    for s in (s for s in first if s > start):  # redone after the restart: the same loss
        assert math.isclose(first[s], final[s]["loss"], abs_tol=1e-5), s
    starts = read_rows(path, "lifecycle")
    assert [(r["event"], r["attempt"]) for r in starts] == [("trainer_start", 1),
                                                            ("trainer_start", 2)]
    assert all((o / "model" / "model.safetensors").is_file() for o in outs)
    assert not any((o / "adapter").exists() for o in outs)  # full weights, no adapter
    assert not (tmp_path / "two-storage" / TrainerSession.NAME).exists(), \
        "resumable state left behind"


def test_nonfinite_loss_is_skipped_and_counted(pairs_dir, make_config, tmp_path):
    from safetensors.torch import load_file

    data, _ = poison(pairs_dir, tmp_path, positions=[5, 30])  # in two different batches
    cfg = config(make_config, tmp_path, on_nonfinite="skip", max_nonfinite=5)
    result, rows, out = train(cfg, data, tmp_path)
    planned = 64 // GLOBAL_BATCH
    assert result["nonfinite_skipped"] == 2
    assert result["steps_done"] == planned - 2  # the data ran out two batches early
    assert all(math.isfinite(r["loss"]) for r in rows)
    weights = load_file(out / "model" / "model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_nonfinite_loss_stops_with_the_batch_ids(pairs_dir, make_config, tmp_path):
    from pipeline.stages.train import NonFiniteStop

    data, bad = poison(pairs_dir, tmp_path, positions=[9])
    cfg = config(make_config, tmp_path, num_workers=1, micro_batch_size=4,
                 on_nonfinite="stop")
    with pytest.raises(NonFiniteStop, match="non-finite loss at optimizer step 3") as err:
        train(cfg, data, tmp_path)
    report = next((tmp_path / "run-storage").glob("*-nonfinite.json"))
    assert str(report) in str(err.value)
    events = json.loads(report.read_text())["nonfinite_events"]
    assert len(events) == 1 and bad <= set(events[0]["ids"])
    assert not (tmp_path / "run-out" / "model").exists()  # no checkpoint written


def test_nan_gradient_with_a_finite_loss_is_skipped_and_counted(pairs_dir, make_config,
                                                                 tmp_path):
    """Rank 0's loss at optimizer step 3 backpropagates NaN while its value stays finite
    (workers.nonfinite's test hook): DeepSpeed ZeRO-3 skips that update on every rank, the
    guard counts it, training goes on to the planned step count, and the exported weights
    are finite."""
    from safetensors.torch import load_file

    from workers.nonfinite import NAN_GRADIENT_ENV

    cfg = config(make_config, tmp_path, max_steps=6, on_nonfinite="skip", max_nonfinite=2)
    result, rows, out = train(cfg, pairs_dir, tmp_path, env={NAN_GRADIENT_ENV: "3"})
    print(f"steps: {[(r['step'], r['loss'], r['grad_norm']) for r in rows]}")
    assert result["nonfinite_skipped"] == 1
    assert result["steps_done"] == 6  # a skipped update still consumed its batch
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == list(range(1, 7))
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows)  # finite loss
    assert by_step[3]["grad_norm"] is None  # non-finite norm (the sink writes NaN/inf as null)
    assert [by_step[s]["nonfinite_skipped"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(by_step[s]["grad_norm"]) for s in (1, 2, 4, 5, 6))
    weights = load_file(out / "model" / "model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())


@pytest.fixture(scope="module")
def plain_run(pairs_dir, make_config, tmp_path_factory):
    """4 steps of the padded layout with torch AdamW, no offload: the run the packed and the
    offloaded runs must follow (loss curve, final weights)."""
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("plain")
    cfg = config(make_config, tmp, max_steps=4, learning_rate=1e-3, packing=False)
    result, rows, out = train(cfg, pairs_dir, tmp, "plain")
    assert result["steps_done"] == 4
    return ([r["loss"] for r in rows], load_file(out / "model" / "model.safetensors"),
            [r["grad_norm"] for r in rows])


def test_auto_zero_stage_replicates_a_small_model_and_takes_zero3s_steps(
        pairs_dir, plain_run, make_config, tmp_path):
    """train.zero_stage: auto for the toy model in fp32 (a few MB of training state): the
    workers decide ZeRO-0, say so on their trainer_start row, and take ZeRO-3's steps, with
    the same gradient norms (DeepSpeed drops the norm at ZeRO-0: the recipe takes it)."""
    cfg = config(make_config, tmp_path, max_steps=4, learning_rate=1e-3, packing=False,
                 zero_stage="auto")
    result, rows, _ = train(cfg, pairs_dir, tmp_path, "auto")
    assert result["steps_done"] == 4
    starts = [r for r in read_rows(tmp_path / "auto-metrics.jsonl", "lifecycle")
              if r["event"] == "trainer_start"]
    assert [r["zero_stage"] for r in starts] == [0]
    curves = {"zero3": plain_run[0], "auto": [r["loss"] for r in rows]}
    print(f"loss curves: {curves}")
    for a, b in zip(curves["zero3"], curves["auto"], strict=True):
        assert abs(a - b) < 1e-4
    norms = {"zero3": plain_run[2], "auto": [r["grad_norm"] for r in rows]}
    print(f"grad norms: {norms}")
    for a, b in zip(norms["zero3"], norms["auto"], strict=True):
        assert b is not None and math.isfinite(b) and abs(a - b) <= 1e-4 * max(1.0, a)


def test_packed_shared_prompt_training_matches_padded(pairs_dir, plain_run, make_config, tmp_path):
    """The Ray Train workers' packed, shared-prompt step (train.packing, train.share_prompt)
    follows the padded step's loss curve: same pairs, same updates."""
    cfg = config(make_config, tmp_path, max_steps=4, learning_rate=1e-3, packing=True,
                 share_prompt=True)
    result, rows, _ = train(cfg, pairs_dir, tmp_path, "shared")
    assert result["steps_done"] == 4
    curves = {"padded": plain_run[0], "shared": [r["loss"] for r in rows]}
    print(f"loss curves: {curves}")
    for a, b in zip(curves["padded"], curves["shared"], strict=True):
        assert abs(a - b) < 1e-4


@pytest.fixture(scope="module")
def kl_pairs_dir(pairs_dir, toy_world, tmp_path_factory):
    """The pairs with the reference stage's mismatched-completion columns (kto): each pair's
    prompt with the previous pair's responses; their reference log-prob is the initial
    policy's minus an offset of 0..15 nats, so each KL term starts at that offset."""
    import torch
    from transformers import AutoModelForCausalLM

    from workers.logprobs import ResponseLogps
    from workers.train_step import policy_pair_logps, rows_to_pairs

    table = pq.read_table(pairs_dir)
    for side in ("chosen", "rejected"):
        ids = table[f"{side}_ids"].to_pylist()
        table = table.append_column(f"kl_{side}_ids", pa.array(ids[-1:] + ids[:-1],
                                                               pa.list_(pa.int32())))
    model = AutoModelForCausalLM.from_pretrained(toy_world.model_dir, dtype=torch.float32)
    rows = {k: table[k].to_pylist() for k in ("prompt_ids", "kl_chosen_ids", "kl_rejected_ids")}
    with torch.no_grad():
        logps = policy_pair_logps(ResponseLogps(model), rows_to_pairs(
            {"prompt_ids": rows["prompt_ids"], "chosen_ids": rows["kl_chosen_ids"],
             "rejected_ids": rows["kl_rejected_ids"]}, pad_id=0))
    offset = torch.arange(table.num_rows, dtype=torch.float64) % 16
    for side, logp in (("chosen", logps.policy_chosen), ("rejected", logps.policy_rejected)):
        table = table.append_column(f"ref_kl_{side}_logp",
                                    pa.array((logp.double() - offset).tolist(), pa.float64()))
    out = tmp_path_factory.mktemp("pairs-with-kl")
    pq.write_table(table, out / "part-0.parquet")
    return out


def whole_batch_first_loss(cfg, data_dir) -> float:
    """The first step's loss over the whole first global batch (in the promised training
    order) in one process without Ray or DeepSpeed: the Ray-free train step on the initial
    policy, which is what one worker computes."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import validate_loss
    from workers.logprobs import ResponseLogps
    from workers.train_step import RunningMean, pair_loss, rows_to_pairs

    table = pq.read_table(data_dir)
    position = {i: n for n, i in enumerate(table["id"].to_pylist())}
    first = training_order(table, cfg.train.seed)[:cfg.train.global_batch_size]
    rows = table.take([position[i] for i in first]).to_pydict()
    model = AutoModelForCausalLM.from_pretrained(cfg.model.policy, dtype=torch.float32).eval()
    with torch.no_grad():  # the pad id is masked out: any id does (as in kl_pairs_dir)
        loss, _ = pair_loss(ResponseLogps(model), rows_to_pairs(rows, pad_id=0), cfg.loss.name,
                            validate_loss(cfg.loss), RunningMean())
    return float(loss)


@pytest.mark.parametrize("loss", ["kto", "wpo", "bco"])
def test_losses_with_policy_side_needs_train_through_zero3(loss, kl_pairs_dir, make_config,
                                                            tmp_path):
    """kto (KL terms of mismatched completions, gathered across ranks), wpo (weights from
    the policy's token distribution) and bco (running δ all-reduced across ranks) train
    through 2 Ray Train × ZeRO-3 workers. kto's and bco's first-step loss equals the loss
    over the whole global batch in one process, which holds only if the statistics span
    both ranks."""
    cfg = make_config(tmp_path / "cfg", loss={"name": loss, "params": {}},
                      train={"num_workers": 2, "micro_batch_size": 2,
                             "global_batch_size": GLOBAL_BATCH, "learning_rate": 1e-4,
                             "warmup_ratio": 0.0, "lr_schedule": "constant", "max_steps": 3})
    result, rows, _ = train(cfg, kl_pairs_dir, tmp_path, loss)
    assert result["steps_done"] == 3
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    print(f"{loss} first step: {rows[0]}")
    if loss == "kto":
        assert rows[0]["kto/kl"] > 0
    if loss == "wpo":
        assert 0 < rows[0]["wpo/weight_mean"] < 1
    if loss == "bco":
        assert result["final_metrics"]["running_mean"] != 0
    if loss in ("kto", "bco"):
        whole = whole_batch_first_loss(cfg, kl_pairs_dir)
        print(f"{loss} first-step loss: 2 ranks {rows[0]['loss']}, one process {whole}")
        assert abs(rows[0]["loss"] - whole) < 1e-4


def test_cpu_adam_with_offload_matches_adamw(pairs_dir, plain_run, make_config, toy_world,
                                            tmp_path):
    """train.optimizer: cpu_adam (DeepSpeed CPU Adam, ZeRO-Offload of the optimizer states)
    with train.offload_params (ZeRO-3 parameter offload) through the real Ray Train × ZeRO-3
    workers takes the same steps as torch AdamW without offload: same loss curve, same
    final weights, and the weights did move."""
    from safetensors.torch import load_file

    cfg = config(make_config, tmp_path, max_steps=4, learning_rate=1e-3, optimizer="cpu_adam",
                 offload_params=True, packing=False)  # the padded layout, as plain_run
    result, rows, out = train(cfg, pairs_dir, tmp_path, "offload")
    assert result["steps_done"] == 4
    curves = {"plain": plain_run[0], "offload": [r["loss"] for r in rows]}
    weights = {"plain": plain_run[1], "offload": load_file(out / "model" / "model.safetensors")}
    print(f"loss curves: {curves}")
    assert len(curves["plain"]) == 4
    for a, b in zip(curves["plain"], curves["offload"], strict=True):
        assert abs(a - b) < 1e-5
    start = load_file(Path(toy_world.model_dir) / "model.safetensors")
    assert weights["plain"].keys() == weights["offload"].keys()
    gap = max(float((weights["plain"][k] - weights["offload"][k]).abs().max()) for k in start)
    moved = max(float((weights["plain"][k] - start[k]).abs().max()) for k in start)
    print(f"max weight gap {gap:.2e}, max weight change {moved:.2e}")
    assert moved > 1e-3 and gap < 1e-5
