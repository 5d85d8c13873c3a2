"""The benchmarks' harness: printing figures and ratios, the machine, timers, peak memory
of this process and of Ray's, profiles, timed UDF subclasses, a recording metrics sink, and
running a function in a fresh process. The fixtures (models, pairs, TRL, a local Ray
cluster) are in bench/fixtures.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self


def fmt(value: float) -> str:
    """Three significant figures, no exponent for the sizes benchmarks print."""
    if math.isnan(value):
        return "nan"
    a = abs(value)
    if a >= 100 or a == 0:
        return f"{value:.0f}" if a >= 1000 else f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def line(label: str, value: float | str, unit: str = "") -> str:
    """One figure: 'label: value unit'."""
    text = value if isinstance(value, str) else fmt(value)
    return f"{label}: {text}{' ' + unit if unit else ''}"


def ratio_line(label: str, ours: float, theirs: float, target: float | None = None) -> str:
    """The closing line: ours/theirs, and whether it meets the project's target ratio."""
    r = ours / theirs if theirs else float("nan")
    text = f"{label}: {r:.2f}x"
    if target is not None:
        text += f" (target >= {target:g}x: {'met' if r >= target else 'missed'})"
    return text


def emit(*lines: str) -> None:
    for text in lines:
        print(text, flush=True)


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} x {cpu}, {mem:.0f} GiB RAM, no GPU" if not torch.cuda.is_available()
            else f"{os.cpu_count()} CPUs, GPU {torch.cuda.get_device_name(0)}") + (
        f"; Python {platform.python_version()}, torch {torch.__version__}")



@dataclass
class Timer:
    seconds: float = 0.0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0


def peak_rss_mib() -> float:
    """Peak resident memory of this process (ru_maxrss, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_peak_rss_mib(pid: int) -> float | None:
    """Peak resident memory (VmHWM) of another live process, in MiB; None once it is gone."""
    try:
        for text in Path(f"/proc/{pid}/status").read_text().splitlines():
            if text.startswith("VmHWM:"):
                return int(text.split()[1]) / 1024
    except OSError:
        return None
    return None


def _parent(pid: int) -> int:
    try:  # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = _parent(pid)
        if pid == ancestor:
            return True
    return False


def processes_matching(marker: str, ancestor: int | None = None) -> list[int]:
    """Pids whose command line contains `marker` (e.g. Ray's 'ray::RayTrainWorker'),
    only descendants of `ancestor` when given (this script's own Ray cluster, not another
    session's on the same machine)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (p / "cmdline").read_bytes() and (
                    ancestor is None or descends_from(int(p.name), ancestor)):
                pids.append(int(p.name))
    return pids


class PeakMemoryWatch:
    """Polls VmHWM (a process's own peak RSS) of processes whose command line contains
    `marker`, from a thread, until stopped: peak memory of Ray workers measured from outside."""

    def __init__(self, marker: str, interval: float = 0.25):
        import threading

        self.marker, self.interval = marker, interval
        self.peak: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in processes_matching(self.marker, ancestor=os.getpid()):
                if pid == os.getpid():
                    continue
                hwm = proc_peak_rss_mib(pid)
                if hwm is not None:
                    self.peak[pid] = max(self.peak.get(pid, 0.0), hwm)
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def print_profile(prof: Any, top: int, label: str, key: str = "tottime") -> None:
    """The `top` functions of a cProfile.Profile by own time (`tottime`) or by time
    including callees (`cumtime`), as shares of the profiled wall."""
    import pstats

    stats = pstats.Stats(prof)
    total = stats.total_tt or 1.0
    col = 2 if key == "tottime" else 3
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][col], reverse=True)[:top]
    for (file, lineno, fn), values in rows:
        where = f"{Path(file).parent.name}/{Path(file).name}:{lineno}({fn})"
        emit(f"{label}: {values[col] / total:6.1%} {key}, {values[1]:7d} calls  {where}")



def timed_subclass(cls: type, log_path: Path, methods: Sequence[str]) -> type:
    """A subclass of a real actor/UDF class that appends one JSON line per constructor and
    per call of `methods` to `log_path` ({"cls", "what", "pid", "start", "s"}): engine start
    and engine-only time, measured inside the actor, without changing what it does."""

    def record(what: str, start: float, seconds: float) -> None:
        import json

        with open(log_path, "a") as f:
            f.write(json.dumps({"cls": cls.__name__, "what": what, "pid": os.getpid(),
                                "start": start, "s": seconds}) + "\n")

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        t0, wall = time.perf_counter(), time.time()
        cls.__init__(self, *args, **kwargs)
        record("init", wall, time.perf_counter() - t0)

    def wrap(name: str) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0, wall = time.perf_counter(), time.time()
            out = getattr(cls, name)(self, *args, **kwargs)
            record(name, wall, time.perf_counter() - t0)
            return out
        return call

    body = {"__init__": init, **{m: wrap(m) for m in methods}}
    return type(cls.__name__, (cls,), body)


def read_timings(log_path: Path) -> list[dict[str, Any]]:
    import json

    if not log_path.exists():
        return []
    return [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]


@contextlib.contextmanager
def timed_vllm_udfs(log_path: Path) -> Iterator[Path]:
    """Swap `workers.vllm_pool`'s Engine / PairLogprobs / Sampler for timed subclasses
    (the stages and pipeline.engines look them up in that module at call time); restore them
    on exit. Engine records are model compute (and its start); a UDF's record is the wall of
    one batch as Ray Data sees it (waiting on its engine included)."""
    import workers.vllm_pool as pool

    real = {n: getattr(pool, n) for n in ("Engine", "PairLogprobs", "Sampler")}
    pool.Engine = timed_subclass(real["Engine"], log_path, ["sequence_logprobs", "sample",
                                                            "sequence_collisions", "update_weights"])
    pool.PairLogprobs = timed_subclass(real["PairLogprobs"], log_path, ["__call__"])
    pool.Sampler = timed_subclass(real["Sampler"], log_path, ["__call__"])
    try:
        yield log_path
    finally:
        for n, c in real.items():
            setattr(pool, n, c)



class StepRecorder:
    """A stand-in for `workers.metrics_sink.MetricsSink` (same methods): keeps each row with
    the time it arrived, so step throughput is measured by wall clock between steps."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, str, dict[str, Any]]] = []

    def plan(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_context(self, **kwargs: Any) -> None:
        pass

    def log(self, kind: str, metrics: dict[str, Any]) -> None:
        self.rows.append((time.time(), kind, dict(metrics)))

    def get(self) -> list[tuple[float, str, dict[str, Any]]]:
        return self.rows


def steady_rate(times: Sequence[float], per_step: float, skip: int = 1) -> float:
    """Units per second between the end of step `skip` and the end of the last step
    (the first `skip` steps are warm-up and not counted)."""
    if len(times) <= skip:
        return float("nan")
    return per_step * (len(times) - skip) / (times[-1] - times[skip - 1])


def _child(fn: Any, args: tuple[Any, ...], queue: Any) -> None:
    queue.put(fn(*args))


def in_fresh_process(fn: Any, *args: Any) -> Any:
    """fn(*args) in a spawned process (so its peak RSS is its own); returns its result."""
    import multiprocessing as mp
    import queue as q

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, results))
    p.start()
    while True:
        try:
            out = results.get(timeout=2)
            break
        except q.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{getattr(fn, '__name__', fn)} died (exit code {p.exitcode})")
    p.join()
    return out
