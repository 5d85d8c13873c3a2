"""Where a Ray worker process's output goes: its own file under the run's logs directory.

`setup_worker_logging` is the `worker_process_setup_hook` of the run's Ray job (see
pipeline.cluster.init_kwargs): every worker process Ray starts for the run (actors, Ray
Data tasks, Ray Train workers, vLLM engines) sends its stdout and stderr, Python's and the
C/C++ libraries' alike, to `$RAYALIGN_LOG_DIR/worker-<pid>.log` instead of streaming them
to the driver's console. The driver later renames each actor's file after its class
(pipeline.console.name_actor_logs), so logs/ holds one file per actor or worker.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LOG_DIR_ENV = "RAYALIGN_LOG_DIR"


def worker_log_path(log_dir: str | Path, pid: int | None = None) -> Path:
    return Path(log_dir) / f"worker-{pid or os.getpid()}.log"


def setup_worker_logging() -> None:
    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir:
        return
    path = worker_log_path(log_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
