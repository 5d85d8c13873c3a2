"""The environment the pipeline's workers really get, read from inside Ray workers.

A driver process starts (or joins) Ray the way `rayalign run` does (`pipeline.cluster.connect`)
with tokens in its own environment, then a task and an actor report `os.environ`: they
must hold the worker defaults (`pipeline.cluster.WORKER_ENV_DEFAULTS`) and none of the tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

SECRET = "hf_not-a-real-token-91c2e7"
SECRET_NAMES = ("HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY")

DRIVER = """
import json, os, sys
import ray
from pipeline.cluster import connect
from pipeline.config import load_config

connect(load_config(sys.argv[1]))

@ray.remote(num_cpus=0)
def environ():
    return dict(os.environ)

@ray.remote(num_cpus=0)
class Probe:
    def environ(self):
        return dict(os.environ)

probe = Probe.remote()
seen = {"task": ray.get(environ.remote()), "actor": ray.get(probe.environ.remote())}
print("ENV " + json.dumps(seen))
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_environments(make_config, tmp_path, **ray_section) -> dict[str, dict[str, str]]:
    """Run DRIVER with the secrets set; {'task': env, 'actor': env} as the workers saw them."""
    cfg = make_config(tmp_path / "run", ray={"num_cpus": 1, **ray_section})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    temp = Path(tempfile.mkdtemp(prefix="ra-env-", dir="/tmp"))  # short: unix socket paths
    env = {**os.environ, **{name: SECRET for name in SECRET_NAMES},
           "RAYALIGN_RAY_TEMP_DIR": str(temp)}
    for name in ("RAY_ADDRESS", *WORKER_VARS):  # what the workers get must come from connect
        env.pop(name, None)
    try:
        out = subprocess.run([sys.executable, "-c", DRIVER, str(config)], env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("ENV "))
    return json.loads(line[4:])


WORKER_VARS = ("DS_ACCELERATOR", "VLLM_ENABLE_V1_MULTIPROCESSING", "RAY_TRAIN_V2_ENABLED")


def check(seen: dict[str, dict[str, str]]) -> None:
    from pipeline.cluster import WORKER_ENV_DEFAULTS

    for where, environ in seen.items():
        leaked = [name for name, value in environ.items() if SECRET in value]
        assert not leaked, f"the {where} sees the driver's tokens in {leaked}"
        for name in WORKER_VARS:
            assert environ.get(name) == WORKER_ENV_DEFAULTS[name], (where, name)


def test_workers_of_a_local_cluster_get_the_worker_env_and_no_tokens(make_config, tmp_path):
    """ray.address unset: connect starts a local cluster, whose processes are the driver's
    children."""
    check(worker_environments(make_config, tmp_path, dashboard_port=_free_port()))


def test_workers_of_a_joined_cluster_get_the_worker_env_and_no_tokens(ray_cluster, make_config,
                                                                       tmp_path):
    """ray.address set: the driver joins a running cluster (the session's)."""
    import ray

    check(worker_environments(make_config, tmp_path,
                              address=ray.get_runtime_context().gcs_address))
