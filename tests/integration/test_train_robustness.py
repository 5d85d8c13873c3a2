"""Training that never hangs and fails once, through the real Ray Train × DeepSpeed ZeRO-3 workers.

Ranks whose micro-batches differ:

Long multi-turn chat data (tests/data/make_long_chat.py) goes through the real prepare stage
with `truncation: keep_end`; the pair ids are then chosen so that, in the order the train
stage promises, rank 0's slice of every global micro-batch holds those long, truncated pairs
and rank 1's the toy world's short, untruncated ones. The two ranks then differ in sequence length, response
tokens, LM-head chunks at `logprob_chunk_size` and packed rows: under ZeRO-3 a module called
a data-dependent number of times desynchronises the ranks' parameter gathers and the group
hangs (it did, on real data). Each run must finish (a stall fails within
`stall_timeout_s`) and follow a one-worker run over the same global batches.

A rank that stalls on purpose (`workers.watchdog.inject_stall`) is ended by its watchdog
within `stall_timeout_s`, with a report naming the stage, round, step, phase and ranks; a
restarted group resumes from the checkpoint, or, with no retries left, the stage fails with
that report. An error a retry would repeat (a loss missing its input) fails once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.integration.train_run import train

pytestmark = pytest.mark.integration

MICRO, WORKERS, CHUNK, STEPS = 2, 2, 32, 4
MAX_PROMPT, MAX_RESPONSE = 96, 128


@pytest.fixture(scope="module")
def uneven_pairs(ray_cluster, make_config, prepared_pairs, tmp_path_factory):
    """Rank 0 always gets long chat pairs (truncated), rank 1 short toy pairs (not)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from make_long_chat import write_long_chat

    from pipeline.stages.prepare import run_prepare
    from pipeline.stages.train import order_key

    root = tmp_path_factory.mktemp("uneven")
    raw = write_long_chat(root / "long.parquet", n_pairs=48, seed=3)
    cfg = make_config(root / "cfg", data={"train": [str(raw)], "max_prompt_tokens": MAX_PROMPT,
                                          "max_response_tokens": MAX_RESPONSE,
                                          "truncation": "keep_end"})
    run_prepare(cfg.data.train, cfg.model.tokenizer_path, cfg.data, root / "prepared", False)
    long_ = pq.read_table(root / "prepared" / "pairs.parquet").to_pylist()
    short = pq.read_table(prepared_pairs).to_pylist()  # the toy pairs, ~50 tokens, untruncated
    half = MICRO * (min(len(long_), len(short)) // MICRO)
    # ids whose place in the training order puts a long pair on rank 0, a short one on rank 1
    ids = [f"u{i:04d}" for i in range(2 * half)]
    keys = order_key(pa.table({"id": ids}), 0, shuffle=True).to_pylist()
    ordered = [i for _, i in sorted(zip(keys, ids))]
    picked = []
    for pos, new_id in enumerate(ordered):
        on_rank0 = pos % (MICRO * WORKERS) < MICRO
        source = (long_ if on_rank0 else short)[pos // (MICRO * WORKERS) * MICRO + pos % MICRO]
        picked.append({**source, "id": new_id})
    out = pa.Table.from_pylist(picked)
    n = out.num_rows
    out = out.append_column("ref_chosen_logp", pa.array([-40.0] * n, pa.float64()))
    out = out.append_column("ref_rejected_logp", pa.array([-40.0] * n, pa.float64()))
    data = root / "with-ref"
    data.mkdir()
    pq.write_table(out, data / "part-0.parquet")
    return data, ordered, {r["id"]: r for r in picked}


def rank_shapes(ordered, rows, step):
    """(response tokens, LM-head chunks at CHUNK rows) of each rank's slice of a global batch."""
    batch = ordered[step * MICRO * WORKERS:(step + 1) * MICRO * WORKERS]
    out = []
    for rank in range(WORKERS):
        mine = [rows[i] for i in batch[rank * MICRO:(rank + 1) * MICRO]]
        n = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in mine)
        out.append((n, -(-n // CHUNK)))
    return out


def small_config(make_config, tmp_path, **train):
    return make_config(tmp_path / "cfg", loss={"name": "sigmoid", "params": {"beta": 0.1}},
                       data={"max_prompt_tokens": MAX_PROMPT, "max_response_tokens": MAX_RESPONSE},
                       train={"num_workers": WORKERS, "micro_batch_size": MICRO,
                              "global_batch_size": MICRO * WORKERS, "learning_rate": 1e-4,
                              "warmup_ratio": 0.0, "lr_schedule": "constant", **train})


def layout_config(make_config, tmp_path, workers, **layout):
    return make_config(
        tmp_path / f"cfg{workers}", loss={"name": "sigmoid", "params": {"beta": 0.1}},
        data={"max_prompt_tokens": MAX_PROMPT, "max_response_tokens": MAX_RESPONSE},
        train={"num_workers": workers, "micro_batch_size": MICRO * WORKERS // workers,
               "global_batch_size": MICRO * WORKERS, "learning_rate": 1e-3,
               "warmup_ratio": 0.0, "lr_schedule": "constant", "max_steps": STEPS,
               "logprob_chunk_size": CHUNK, "stall_timeout_s": 90, "max_failures": 0, **layout})


@pytest.fixture(scope="module")
def one_worker_curve(uneven_pairs, make_config, tmp_path_factory):
    """The loss curve of one worker over the same global batches (no rank to disagree with)."""
    data, _, _ = uneven_pairs
    tmp = tmp_path_factory.mktemp("one-worker")
    result, metrics, _ = train(layout_config(make_config, tmp, 1), data, tmp, "w1")
    assert result["steps_done"] == STEPS
    return [m["loss"] for m in metrics]


@pytest.mark.parametrize("layout", [{"packing": False}, {}], ids=["padded", "packed-shared"])
def test_ranks_with_different_batches_train_like_one_worker(uneven_pairs, one_worker_curve,
                                                            make_config, tmp_path, layout):
    """Padded and the default layout (packed rows with a shared prompt: a rank with long
    pairs packs more rows): the same losses as one worker (both are exact, so one curve
    serves both)."""
    data, ordered, rows = uneven_pairs
    shapes = [rank_shapes(ordered, rows, s) for s in range(STEPS)]
    print(f"(response tokens, chunks) per rank and step: {shapes}")
    assert all(r0[1] > r1[1] for r0, r1 in shapes), "the ranks' chunk counts must differ"
    truncated = {rank: {rows[i]["truncated"] for s in range(STEPS)
                        for i in ordered[s * MICRO * WORKERS:][rank * MICRO:(rank + 1) * MICRO]}
                 for rank in range(WORKERS)}
    assert truncated[0] != truncated[1], f"the ranks' truncation must differ: {truncated}"
    result, metrics, _ = train(layout_config(make_config, tmp_path, WORKERS, **layout), data,
                               tmp_path, f"w{WORKERS}")
    assert result["steps_done"] == STEPS
    curve = [m["loss"] for m in metrics]
    print(f"loss curves: {WORKERS} workers {curve}, 1 worker {one_worker_curve}")
    for a, b in zip(curve, one_worker_curve, strict=True):
        assert abs(a - b) < 1e-4


STALL_TIMEOUT = 20  # setup is allowed 3x: 60 s


def test_a_stalled_rank_is_ended_and_the_group_resumes(uneven_pairs, make_config, tmp_path):
    """Rank 1 stops before step 4 (its peer then waits in a ZeRO-3 gather): both watchdogs
    end their workers after STALL_TIMEOUT s, Ray Train restarts the group from the step-2
    checkpoint, and the stage finishes, reporting the stall it survived."""
    data, _, _ = uneven_pairs
    cfg = small_config(make_config, tmp_path, max_steps=6, checkpoint_every=2, max_failures=1,
                       stall_timeout_s=STALL_TIMEOUT)
    marker = tmp_path / "stalled-once"
    result, metrics, _ = train(cfg, data, tmp_path, "stall",
                               env={"RAYALIGN_INJECT_STALL": f"1:4:{marker}"})
    assert marker.exists(), "the stall was not injected"
    assert result["steps_done"] == 6
    stalls = result["stalls_survived"]
    print(f"stalls survived: {stalls}")
    mine = [x for x in stalls if x["who"] == "rank 1"]
    assert mine and mine[0]["step"] == 4 and mine[0]["phase"] == "data"
    assert all(x["seconds"] >= STALL_TIMEOUT for x in stalls)
    resumed = {m["resumed_from"] for m in metrics}
    assert resumed == {0, 2}, f"resumed_from values {resumed}: expected a restart from step 2"
    steps_after = [m["step"] for m in metrics if m["resumed_from"] == 2]
    assert steps_after == [3, 4, 5, 6]  # step 3 finished before the stall: redone once


def test_a_stall_without_retries_fails_naming_where(uneven_pairs, make_config, tmp_path):
    from workers.watchdog import TrainingStalled

    data, _, _ = uneven_pairs
    cfg = small_config(make_config, tmp_path, max_steps=4, max_failures=0,
                       stall_timeout_s=STALL_TIMEOUT)
    with pytest.raises(TrainingStalled) as err:
        train(cfg, data, tmp_path, "stall-fail", env={"RAYALIGN_INJECT_STALL": "1:2"})
    message = str(err.value)
    print(message)
    assert message.startswith("train stage, round 0: ")
    assert "rank 1 made no progress for" in message and "at step 2 (phase 'data')" in message
    assert "rank 0 step 2 phase 'forward'" in message  # its peer, waiting in a collective
    assert "where " in message and "File " in message  # a stack of where it was stuck


def test_an_error_a_retry_would_repeat_fails_once(uneven_pairs, make_config, tmp_path):
    """A loss missing its input (no reference column) is not a fault: Ray Train must not
    retry it max_failures times; the stage fails once with the loss's own message."""
    from workers.watchdog import PermanentError

    data, _, _ = uneven_pairs
    table = pq.read_table(data).drop_columns(["ref_rejected_logp"])
    broken = tmp_path / "no-ref"
    broken.mkdir()
    pq.write_table(table, broken / "part-0.parquet")
    cfg = small_config(make_config, tmp_path, max_steps=2, max_failures=2)
    with pytest.raises(PermanentError) as err:
        train(cfg, broken, tmp_path, "permanent")
    print(err.value)
    assert "train stage, round 0: rank " in str(err.value)
    assert "ref_rejected" in str(err.value)
    assert err.value.starts == {"rank 0": 1, "rank 1": 1}, "training was retried"
