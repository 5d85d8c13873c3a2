"""The workers' TrainLoopConfig comes from TrainConfig in one place: every train.* field
either reaches the workers under its own name or is one the driver uses itself."""

from __future__ import annotations

from dataclasses import fields

from pipeline.config import TrainConfig, parse_config
from pipeline.stages.train import DRIVER_ONLY, loop_config, round_job
from workers.recipe.options import TrainLoopConfig


def test_every_train_field_reaches_the_workers_or_the_driver():
    loop = {f.name for f in fields(TrainLoopConfig)}
    train = set(TrainConfig.model_fields)
    assert train - loop - DRIVER_ONLY == set(), "train.* fields that no one reads"
    assert DRIVER_ONLY <= train and not DRIVER_ONLY & loop


def test_loop_config_copies_and_derives(tmp_path):
    cfg = parse_config({"run_dir": str(tmp_path / "run"), "model": {"policy": str(tmp_path)},
                        "data": {"train": ["x.parquet"], "max_response_tokens": 256},
                        "train": {"micro_batch_size": 4, "global_batch_size": 16,
                                  "num_workers": 2, "learning_rate": 3e-5,
                                  "warmup_ratio": 0.25, "precision": "bf16",
                                  "logprob_chunk_size": 512, "stall_timeout_s": 42}})
    loop = loop_config(cfg, env={"A": "1"})
    assert (loop.learning_rate, loop.micro_batch_size, loop.grad_accum_steps) == (3e-5, 4, 2)
    assert loop.stall_timeout_s == 42 and loop.bf16
    assert loop.head_calls == 4  # 2 sequences x 4 pairs x 256 tokens / 512 rows per call
    assert loop.extra_env == {"A": "1"}
    job = round_job(cfg, 3, "k", "policy", steps=8, out_dir=tmp_path, dataset=None)
    assert (job.round_index, job.optimizer_steps, job.warmup_steps) == (3, 8, 2)
    assert job.policy_path == "policy" and job.out_dir == str(tmp_path.resolve())
