"""Stage keys cover what changes a stage's result and nothing else: a scheduling-only
change to the train section keeps the trained round (no retraining)."""

from __future__ import annotations

import pytest

from pipeline.config import TrainConfig, parse_config
from pipeline.dag import OFFLINE_ROUND, Round, stage_key
from pipeline.manifest import Manifest

BASE = {"model": {"policy": "m"}, "data": {"train": ["d.parquet"]},
        "loss": {"name": "sigmoid", "params": {"beta": 0.1}}}


def train_key(tmp_path, **train) -> str:
    cfg = parse_config({**BASE, "train": {"num_workers": 2, "micro_batch_size": 2,
                                          "global_batch_size": 8, **train}})
    r = Round(cfg, tmp_path, 0, "m", "m", {}, policy_digest="policy-digest",
              done={"reference": Manifest("reference", "reference-key", {}, {}, 0.0, 0.0)})
    stage = next(s for s in OFFLINE_ROUND if s.name == "train")
    return stage_key(stage.name, stage.key_inputs(r))


@pytest.mark.parametrize("change", [
    {"max_failures": 7}, {"max_failures": -1}, {"placement_strategy": "STRICT_SPREAD"},
    {"resources": {"gpu_node": 0.01}}, {"cpus_per_worker": 3}, {"checkpoint_every": 5}])
def test_scheduling_changes_do_not_retrain(tmp_path, change):
    assert train_key(tmp_path, **change) == train_key(tmp_path)


@pytest.mark.parametrize("change", [
    {"learning_rate": 1e-4}, {"num_workers": 4}, {"micro_batch_size": 1}, {"seed": 1},
    {"optimizer": "cpu_adam"}, {"offload_params": True}, {"on_nonfinite": "stop"},
    {"gpus_per_worker": 1}, {"logprob_chunk_size": 8}])
def test_result_changes_retrain(tmp_path, change):
    assert train_key(tmp_path, **change) != train_key(tmp_path)


def test_scheduling_only_names_real_fields():
    assert TrainConfig.SCHEDULING_ONLY <= set(TrainConfig.model_fields)
