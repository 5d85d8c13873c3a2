"""What a person watching a run sees, and where everything else goes.

The console shows one live line per stage (a spinner and the elapsed time; for training the
optimizer steps done of those planned, the rate, the ETA, the loss and the reward margin,
polled from the MetricsSink actor), the stage summaries the stages print, our own warnings
and the results table. Everything else goes to `<run_dir>/logs/`:
  - driver.log: the driver's library logging (Ray, Ray Data, Ray Train, transformers, …),
    Python warnings and the full traceback of a failed stage;
  - <ActorClass>-<pid>.log / worker-<pid>.log: the stdout and stderr of every process Ray
    starts for the run (workers.logsetup, installed as the job's setup hook).
`verbose=True` (`rayalign run --verbose`) leaves all of it on the console, live, instead.
A failed stage is reported with its round, stage, the actor or worker it came from (the
`pid=` Ray puts in remote errors) and the log file holding the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from workers.logsetup import worker_log_path

# a terminal gives its width; a log file or pipe (nohup, a sweep's runs, CI) gets room for
# the summary tables rather than rich's 80 columns; COLUMNS overrides both
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)

# Loggers of the libraries the driver runs; quiet, they write to driver.log only.
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "ray.util",
                   "vllm", "deepspeed", "DeepSpeed", "transformers", "torch", "py.warnings", "filelock",
                   "fsspec", "urllib3", "matplotlib")


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def log_dir_of(run_dir: Path) -> Path:
    return Path(run_dir).resolve() / "logs"


@contextlib.contextmanager
def quiet_driver(log_dir: Path, verbose: bool = False) -> Iterator[Path]:
    """While the run's driver runs: send the libraries' logging and Python warnings to
    log_dir/driver.log (also to the console when verbose), turn Ray Data's progress bars and
    execution banners off (on when verbose) and, unless verbose, send what native code
    writes to the driver's stderr (Ray's C++ core worker) and the messages Ray pushes to
    the driver to driver.log too; Python's own sys.stderr still reaches the console."""
    path = _driver_logging(log_dir, verbose)
    if verbose:
        yield path
        return
    import ray._private.worker as ray_worker

    pushed = getattr(ray_worker, "print_to_stdstream", None)
    if pushed is not None:  # used by Ray's error listener only, with log_to_driver=False
        ray_worker.print_to_stdstream = _log_pushed
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    python_stderr = sys.stderr
    sys.stderr = open(saved, "w", buffering=1, closefd=False)  # noqa: SIM115 (closed below)
    try:
        yield path
    finally:
        sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)
        if pushed is not None:
            ray_worker.print_to_stdstream = pushed


def _log_pushed(data: dict[str, Any], ignore_prefix: bool = False) -> None:
    for line in data.get("lines", []):
        logging.getLogger("ray.pushed").warning("(%s) %s", data.get("pid"), line)


def _driver_logging(log_dir: Path, verbose: bool) -> Path:
    import ray.data  # its import configures the "ray.data" logger; do it before we change it

    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "driver.log"
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == "rayalign-driver-log":  # a second run in this process
            root.removeHandler(h)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name("rayalign-driver-log")
    root.addHandler(handler)
    logging.captureWarnings(True)
    if not verbose:
        # The libraries' records propagate to the root logger's file handler only. (ray.init
        # clears the "ray" logger's handlers when it does not configure logging itself, see
        # pipeline.cluster.init_kwargs; propagating, its records still reach driver.log.)
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            for h in list(logger.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    logger.removeHandler(h)
            logger.propagate = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    return path


def name_actor_logs(log_dir: Path) -> None:
    """Rename each actor's worker-<pid>.log after its class (<Class>-<pid>.log). Needs the
    Ray state API (the dashboard); without it the files keep their pid names."""
    import ray

    if not ray.is_initialized():
        return
    try:
        from ray.util.state import list_actors

        # this run's cluster (another one may run on the machine)
        actors = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                             limit=10_000, raise_on_missing_output=False)
    except Exception as err:  # noqa: BLE001 (no dashboard, cluster gone: names are a convenience)
        logging.getLogger(__name__).warning("log files keep their pid names: %s", err)
        return
    for actor in actors:
        src = worker_log_path(log_dir, actor.pid) if actor.pid else None
        if src is not None and src.exists():
            name = re.sub(r"[^A-Za-z0-9_.]+", "_", actor.class_name or "actor").strip("_")
            src.rename(log_dir / f"{name}-{actor.pid}.log")


def _message(err: BaseException) -> str:
    """The error's own message: the last line of a remote traceback, else its first line."""
    lines = [x.strip() for x in ANSI.sub("", str(err)).splitlines() if x.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1]
    return last if len(lines) > 1 and re.match(r"^[A-Za-z_.]+(Error|Exception|Stalled|Stop)\b", last) \
        else lines[0]


def report_failure(err: BaseException, round_index: int, stage: str, log_dir: Path,
                   verbose: bool = False) -> None:
    """Print where a stage failed and which logs hold the rest; the full traceback goes to
    driver.log. Marks the error as reported (the CLI then prints no traceback)."""
    name_actor_logs(log_dir)
    driver_log = log_dir / "driver.log"
    with driver_log.open("a") as f:
        f.write(f"[round {round_index}] {stage} failed:\n{''.join(traceback.format_exception(err))}\n")
    say = lambda text: console.print(text, highlight=False, soft_wrap=True)  # paths unbroken
    say(f"[red]error[/]: round {round_index}, stage {stage}: {type(err).__name__}: {_message(err)}")
    text = ANSI.sub("", "".join(traceback.format_exception(err)))  # Ray colours the call
    origins: dict[str, str] = {}  # pid → the remote call Ray names with it, if any
    for where, pid in re.findall(r"(ray::[\w.()]+)?\s*\(pid=(\d+)", text):
        origins[pid] = origins.get(pid) or where
    for pid, where in origins.items():
        logs = sorted(log_dir.glob(f"*-{pid}.log"))
        say(f"  from {where or 'a Ray worker'} (pid {pid})" + (f": log {logs[0]}" if logs else ""))
    say(f"  full traceback: {driver_log}; every worker's output: {log_dir}")
    if verbose:
        console.print_exception()
    try:
        err.rayalign_reported = True  # type: ignore[attr-defined]
    except AttributeError:
        pass


class StageDisplay:
    """The live line of one stage (see the module docstring); for `train` it polls the
    MetricsSink's `progress`. On a terminal it updates in place; elsewhere (a pipe, a log)
    only its final state is printed, once."""

    def __init__(self, label: str, sink: Any = None, stage: str = "", round_index: int = 0,
                 poll_s: float = 1.0):
        self.label, self.sink, self.stage, self.round = label, sink, stage, round_index
        self.poll_s = poll_s
        self.progress = Progress(SpinnerColumn(finished_text="[green]✓"),
                                 TextColumn("{task.description}"), BarColumn(bar_width=12),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                 console=console)
        self.task = self.progress.add_task(label, total=None, detail="")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self.progress.start()
        if self.sink is not None and self.stage == "train":
            self._thread = threading.Thread(target=self._poll, daemon=True, name="stage-display")
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._update()
        task = self.progress.tasks[0]
        if exc_type is None:
            total = task.total or max(task.completed, 1)
            self.progress.update(self.task, total=total, completed=total)
        else:
            self.progress.update(self.task, description=f"[red]✗ {self.label} failed")
        self.progress.stop()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._update()

    def _update(self) -> None:
        import ray

        try:
            state = ray.get(self.sink.progress.remote("train", self.round), timeout=5)
        except Exception:  # noqa: BLE001 (the display is best effort; the stage reports its own errors)
            return
        if state["step"] is None:
            return
        self.progress.update(self.task, total=state["total"], completed=state["step"],
                             detail=train_detail(state))


def train_detail(state: dict[str, Any]) -> str:
    """'12/40 steps · 0.80/s · ETA 0:35 · loss 0.693 · margin 0.012'."""
    step, total = state["step"], state["total"]
    parts = [f"{step}/{total or '?'} steps"]
    rate = state.get("steps_per_s")
    if rate:
        parts.append(f"{rate:.2f}/s")
        if total:
            left = round(max(total - step, 0) / rate)
            parts.append(f"ETA {left // 60}:{left % 60:02d}")
    for key, name in (("loss", "loss"), ("rewards/margins", "margin")):
        if isinstance(state.get(key), (int, float)):
            parts.append(f"{name} {state[key]:.3f}")
    return " · ".join(parts)
