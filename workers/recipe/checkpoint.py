"""The Ray Train checkpoint protocol of the recipe.

Every `checkpoint_every` optimizer steps each rank saves its DeepSpeed partition files and
reports them; Ray Train merges the ranks' files into one checkpoint directory, and rank 0
adds a round marker (round, the round's key, step). A group that Ray Train restarts gets the
latest checkpoint; it resumes from it only for the round it names with the same key (an
earlier round's checkpoint, or one of other inputs, is not this round's state).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workers.nonfinite import NonFiniteGuard, all_ranks, local_weights_finite
from workers.train_step import RunningMean

DS_TAG = "deepspeed"  # the DeepSpeed checkpoint tag inside a Ray Train checkpoint
ROUND_MARKER = "rayalign_round.json"  # which round (and key, step) a checkpoint belongs to


@dataclass
class LoopState:
    """What a DeepSpeed checkpoint carries besides weights, optimizer and scheduler."""

    step: int = 0          # optimizer steps done
    cursor: int = 0        # global micro-batches consumed (skipped ones included)
    skipped: int = 0       # micro-batches dropped (the guard counts; saved with the state)
    running: RunningMean = field(default_factory=RunningMean)  # bco's δ (running stats)

    def __post_init__(self) -> None:
        if isinstance(self.running, dict):  # restored from a checkpoint's client_state
            self.running = RunningMean(**self.running)


def checkpoint_dir_name(round_index: int, step: int) -> str:
    return f"checkpoint-round-{round_index}-step-{step:07d}"


def save(engine, state: LoopState, metrics: dict[str, Any], guard: NonFiniteGuard, device,
         rank: int, round_index: int, key: str) -> None:
    """A DeepSpeed checkpoint (each rank its own partition files, merged by Ray Train into
    one directory) that a restarted worker group resumes from. Never one with NaN weights."""
    import ray.train
    from ray.train import Checkpoint

    if not all_ranks(local_weights_finite(engine.module), device):
        guard.record("weights", state.step, [])
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        loop_state = {**asdict(state), "skipped": guard.skipped}
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"loop_state": loop_state})
        if rank == 0:
            (Path(tmp) / ROUND_MARKER).write_text(json.dumps(
                {"round": round_index, "key": key, "step": state.step}))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_dir_name(round_index, state.step))


def round_of(checkpoint) -> dict[str, Any] | None:
    """The round marker of a checkpoint ({round, key, step}), or None."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        marker = Path(d) / ROUND_MARKER
        return json.loads(marker.read_text()) if marker.is_file() else None


def resumes(checkpoint, round_index: int, key: str) -> bool:
    """Is `checkpoint` a state of this round (same round, same inputs)?"""
    marker = round_of(checkpoint)
    return marker is not None and (marker["round"], marker["key"]) == (round_index, key)


def restore(engine, checkpoint) -> LoopState:
    """Weights, optimizer, LR schedule and loop state from a checkpoint `resumes` accepted."""
    with checkpoint.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag=DS_TAG)
    if client is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint in {checkpoint.path}")
    return LoopState(**client["loop_state"])
