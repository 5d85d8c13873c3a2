"""Running `rayalign run` in a test as a user would: in its own process, with its own local
Ray cluster, its console output captured."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def run_cli(tmp_path: Path, cfg, *args: str) -> subprocess.CompletedProcess:
    """`rayalign run` on `cfg` (written to tmp_path/config.yaml) in a new process."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    ray_temp = tempfile.mkdtemp(prefix="ra-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAYALIGN_RAY_TEMP_DIR": ray_temp, "COLUMNS": "120"}
    try:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), *args],
                              capture_output=True, text=True, env=env, timeout=1200, check=False)
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a run writes beside its stages: the console's log files and the trackers' stores.
NOT_STAGES = ("logs", "tensorboard", "mlflow", "wandb", "wandb-data")


def copy_stages(run_dir: Path, to: Path) -> Path:
    """A copy of a finished run's stage directories (not its logs or trackers' stores) at
    `to`: a run there finds those stages up to date, and what it does or writes leaves the
    original run, which other tests read, as it was."""
    shutil.copytree(run_dir, to, ignore=lambda d, _names: NOT_STAGES if Path(d) == run_dir else ())
    return to
