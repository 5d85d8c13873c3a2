"""Shared setup of the side-by-side benchmarks: the bench model, the pairs, timing and
printing helpers, peak-memory probes, a local Ray cluster.

The toy model (`.toy/model`, ~0.9 M parameters) is too small to say anything about
compute, so benchmarks 1-3 run a bigger Qwen2 built from a config (`bench_model_config`,
~12 M parameters, head_dim 64 so that vLLM's CPU attention takes it) with random weights,
saved with `save_pretrained` (safetensors) under `.cache/bench/` (gitignored), beside the
toy tokenizer. The pairs are the toy world's train pairs, tokenised by the prepare stage's
own functions (`pipeline.data.normalize_row` + `tokenize_pair`).

Every script prints one line per figure, `label: value`, with the ratio last.
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

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"
TOY = ROOT / ".toy"

# What the Makefile exports; set here too so that `python bench/x.py` alone behaves the same.
ENV_DEFAULTS = {
    "DS_ACCELERATOR": "cpu",
    "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
    "VLLM_CACHE_ROOT": str(ROOT / ".cache" / "vllm"),
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "auto",
    "HF_DATASETS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}


# The vLLM engine arguments of configs/demo.yaml (reference and sampling pools).
DEMO_ENGINE = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True,
               "kv_cache_space_gib": 1}


def set_env() -> None:
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    # Ray workers import this module for the timed UDF subclasses below (PYTHONPATH is one
    # of the variables pipeline.cluster.worker_env passes through to them).
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    for extra in (str(ROOT / "bench"), str(ROOT)):
        if extra not in paths:
            paths.insert(0, extra)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)


# --- printing ------------------------------------------------------------------------------

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


# --- timing and memory ---------------------------------------------------------------------

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


# --- model and data --------------------------------------------------------------------------

BENCH_MODEL = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 2, "intermediate_size": 1408}


def bench_model_config(vocab_size: int, **overrides: Any):
    """A Qwen2 config (head_dim 64, tied embeddings) of ~12 M parameters at the toy vocabulary."""
    from transformers import Qwen2Config

    kw = {**BENCH_MODEL, **overrides}
    return Qwen2Config(vocab_size=vocab_size, max_position_embeddings=512, tie_word_embeddings=True,
                       rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=2, pad_token_id=0,
                       attention_dropout=0.0, use_sliding_window=False, dtype="float32", **kw)


def qwen2_param_count(cfg) -> int:
    """Parameters of a Qwen2 causal LM with this config, counted from its shapes."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    head = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head
    attn = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k, v (bias), o (no bias)
    mlp = 3 * h * i
    per_layer = attn + mlp + 2 * h  # two RMSNorms
    embed = v * h * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_hidden_layers * per_layer + embed + h


def ensure_toy(toy: Path = TOY) -> Path:
    if not (toy / "model").exists():
        from pipeline.toy import build_toy_world

        build_toy_world(toy, quick=False)
    return toy


def build_bench_model(out: Path | None = None, toy: Path = TOY, seed: int = 0,
                      **overrides: Any) -> Path:
    """The bench model directory (built once: random weights from `seed`, toy tokenizer)."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    ensure_toy(toy)
    tokenizer = AutoTokenizer.from_pretrained(toy / "model")
    cfg = bench_model_config(len(tokenizer), **overrides)
    name = f"qwen2-{round(qwen2_param_count(cfg) / 1e6)}m"
    out = out or CACHE / name
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def load_pairs(tokenizer_path: Path, toy: Path = TOY, limit: int | None = None,
               max_prompt_tokens: int = 64, max_response_tokens: int = 64) -> list[dict[str, Any]]:
    """The toy train pairs through the prepare stage's validation and tokenisation."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from pipeline.config import PrepareConfig
    from pipeline.data import normalize_row, tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    cfg = PrepareConfig(chat_template="always", max_prompt_tokens=max_prompt_tokens,
                     max_response_tokens=max_response_tokens)
    rows = pq.read_table(ensure_toy(toy) / "train.parquet").to_pylist()[:limit]
    return [tokenize_pair(normalize_row(r, cfg), tokenizer, cfg) for r in rows]


def pair_tokens(pairs: Sequence[dict[str, Any]]) -> int:
    """Tokens a padded-free forward over [chosen; rejected] sees: 2·prompt + chosen + rejected."""
    return sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
               for p in pairs)


def write_pairs(pairs: Sequence[dict[str, Any]], path: Path, **columns: Sequence[float]) -> Path:
    """Pairs (plus extra float columns, e.g. ref log-probs) as a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(pairs))
    for name, values in columns.items():
        table = table.append_column(name, pa.array([float(x) for x in values], pa.float64()))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# --- timing the real UDFs from inside their actors ----------------------------------------------

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


# --- the plain HF baselines ------------------------------------------------------------------

def load_hf(model_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model.eval()


def hf_response_logps(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      batch_size: int = 32, pad_id: int = 0) -> list[float]:
    """The plain HF loop: right-padded batches, one forward each, log_softmax, gather, sum
    over response tokens. Per-sequence summed response log-probs, fp32."""
    import torch

    out: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            ps, rs = prompts[start:start + batch_size], responses[start:start + batch_size]
            rows = [list(p) + list(r) for p, r in zip(ps, rs)]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            resp = torch.zeros((len(rows), width), dtype=torch.bool)
            for i, (row, p) in enumerate(zip(rows, ps)):
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
                resp[i, len(p):len(row)] = True
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            out.extend((logp * resp[:, 1:]).sum(-1).tolist())
    return out


# --- TRL -----------------------------------------------------------------------------------

def trl_dataset(pairs: Sequence[dict[str, Any]]):
    """A HF Dataset in TRL's tokenised layout (prompt_ids / chosen_ids / rejected_ids)."""
    from datasets import Dataset

    return Dataset.from_dict({k: [list(map(int, p[k])) for p in pairs]
                              for k in ("prompt_ids", "chosen_ids", "rejected_ids")})


def trl_trainer_class():
    """`trl.DPOTrainer`, fed our tokenised pairs so both sides train on identical tokens
    (its text tokenisation is skipped), with its reference precompute timed."""
    from trl import DPOTrainer

    class SameTokensDPOTrainer(DPOTrainer):
        precompute_seconds = 0.0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                self.precompute_seconds += time.perf_counter() - t0

    return SameTokensDPOTrainer


def trl_config(out_dir: Path, **kw: Any):
    """DPOConfig for a CPU fp32 run: no saving, no logging sinks, no eval."""
    from trl import DPOConfig

    base = {"output_dir": str(out_dir), "report_to": [], "save_strategy": "no",
            "eval_strategy": "no", "logging_strategy": "no", "use_cpu": True, "bf16": False,
            "fp16": False, "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True,
            "remove_unused_columns": False, "precompute_ref_log_probs": True,
            "optim": "adamw_torch", "weight_decay": 0.0, "lr_scheduler_type": "cosine",
            "dataset_num_proc": None}
    base.update(kw)
    return DPOConfig(**base)


# --- Ray -----------------------------------------------------------------------------------

@contextlib.contextmanager
def local_ray(num_cpus: int = 4, log_to_driver: bool = False) -> Iterator[float]:
    """A local Ray cluster for this script only (pipeline.cluster.local_cluster, shut down
    on exit) with the bench's environment; yields how long it took to start."""
    from pipeline.cluster import local_cluster

    set_env()
    env = {k: os.environ[k] for k in ENV_DEFAULTS if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")})
    t0 = time.perf_counter()
    with local_cluster(num_cpus, env, log_to_driver=log_to_driver):
        yield time.perf_counter() - t0


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
