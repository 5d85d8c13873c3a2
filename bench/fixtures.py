"""The benchmarks' fixtures: the bench model, the toy pairs, the HF and TRL sides, the
environment and a local Ray cluster (pipeline.cluster.local_cluster). Printing, timing and
memory probes are in bench/harness.py.

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
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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


def _demo_engine() -> dict[str, Any]:
    """The vLLM engine arguments configs/demo.yaml gives its pools (read from it)."""
    import yaml

    return dict(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["sampling"]["engine"])


DEMO_ENGINE = _demo_engine()


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
            "optim": "adamw_torch_fused", "weight_decay": 0.0, "lr_scheduler_type": "cosine",
            "dataset_num_proc": None}
    base.update(kw)
    return DPOConfig(**base)



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


