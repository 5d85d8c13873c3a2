"""One local Ray cluster for the whole integration session (ray.init is seconds, not free)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# What DeepSpeed runs when a training worker first needs its CPU ops: the shared-memory
# collectives (every ZeRO-3 group) and CPU Adam (train.optimizer: cpu_adam).
BUILD_DEEPSPEED_OPS = """
from deepspeed.comm.torch import build_shm_op
from deepspeed.ops.op_builder import CPUAdamBuilder
build_shm_op()
CPUAdamBuilder().load()
"""


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops_built_early():
    """On a clean clone DeepSpeed compiles its CPU ops with g++ when a worker first needs
    them (1-2 min; then cached in TORCH_EXTENSIONS_DIR). Start that build in the background
    when the session starts, so it overlaps the first tests instead of holding up the first
    training and the cpu_adam test: a worker that needs an op before it is built waits on the
    build's lock, as two workers building it would. Its own session, so that an interrupted
    test run does not kill it mid-build (a stale lock would hold up the next build)."""
    build = subprocess.Popen([sys.executable, "-c", BUILD_DEEPSPEED_OPS], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    yield
    build.wait(timeout=600)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    from pipeline.cluster import local_cluster

    with local_cluster(6, {"VLLM_CPU_KVCACHE_SPACE": "1"}, str(tmp_path_factory.mktemp("ray"))):
        yield


@pytest.fixture(scope="session")
def make_config(toy_world):
    """make_config(run_dir, **sections): a small valid config over the quick toy world."""
    from pipeline.config import parse_config

    def make(run_dir, **sections):
        raw = {
            "run_dir": str(run_dir),
            "model": {"policy": str(toy_world.model_dir)},
            "data": {"train": [str(toy_world.train_path)], "eval": [str(toy_world.eval_path)],
                     "chat_template": "always", "max_prompt_tokens": 64,
                     "max_response_tokens": 64},
            "loss": {"name": "principled", "params": {"beta": 0.1}},
            # ZeRO-3 pinned: the suite proves the partitioned layout (auto would pick ZeRO-0
            # for the toy model; test_train has the test of auto)
            "train": {"num_workers": 2, "zero_stage": 3, "micro_batch_size": 4,
                      "global_batch_size": 16, "learning_rate": 1e-4, "precision": "fp32"},
            "reference": {"batch_size": 64, "cache_dir": str(toy_world.root / "ref-cache"),
                          "engine": {"dtype": "float32", "max_model_len": 256}},
            "sampling": {"batch_size": 64, "max_tokens": 32,
                         "engine": {"dtype": "float32", "max_model_len": 256}},
            "reward": {"kind": "function", "function": "pipeline.toy.reward:toy_gold_rewards"},
            "eval": {"num_prompts": 16},
            "ray": {"num_cpus": 6},
        }
        for section, values in sections.items():
            if isinstance(values, dict) and isinstance(raw.get(section), dict):
                raw[section].update(values)
            else:
                raw[section] = values
        return parse_config(raw)

    return make


@pytest.fixture(scope="session")
def prepared_pairs(ray_cluster, make_config, tmp_path_factory):
    """The quick toy world's training pairs through the prepare stage: a parquet directory."""
    from pipeline.stages.prepare import run_prepare

    root = tmp_path_factory.mktemp("prepared")
    cfg = make_config(root / "unused")
    run_prepare(cfg.data.train, cfg.model.tokenizer_path, cfg.data, root, False)
    return root / "pairs.parquet"


@pytest.fixture(scope="session")
def pairs_dir(prepared_pairs, tmp_path_factory):
    """The prepared toy pairs with reference columns added (the same made-up value): what
    the train stage reads, without a vLLM engine."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(prepared_pairs)
    n = table.num_rows
    table = table.append_column("ref_chosen_logp", pa.array([-40.0] * n, pa.float64()))
    table = table.append_column("ref_rejected_logp", pa.array([-40.0] * n, pa.float64()))
    out = tmp_path_factory.mktemp("pairs-with-ref")
    pq.write_table(table, out / "part-0.parquet")
    return out


@pytest.fixture(scope="session")
def cli_round(make_config, tmp_path_factory):
    """One offline round of the quick toy world run by `rayalign run` in its own process (its
    own local Ray cluster), as a user runs it, with every tracker on: (config, run dir, console
    output). The console, tracking and round tests read this one run; a test that runs the
    pipeline again does it on a copy (tests.integration.cli_run.copy_stages)."""
    from tests.integration.cli_run import free_port, run_cli

    root = tmp_path_factory.mktemp("cli-round")
    cfg = make_config(root / "run", tracking=["tensorboard", "mlflow", "wandb"],
                      ray={"num_cpus": 6, "dashboard_port": free_port()})
    proc = run_cli(root, cfg)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return cfg, root / "run", out


@pytest.fixture(scope="session")
def reward_model_dir(toy_world, tmp_path_factory):
    """A real (untrained) HF reward model: Qwen2 with a 1-logit classification head."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(toy_world.model_dir, num_labels=1)
    model = Qwen2ForSequenceClassification(cfg)
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(toy_world.model_dir).save_pretrained(out)
    return out
