"""Single stages over a finished run: `rayalign eval` and `rayalign export`.

eval: a checkpoint (a round of a run, or any HF model directory) evaluated against the
reference on a config's eval data, through the run's stages (pipeline.dag's reference and
evaluate, after a prepare of the eval split alone; keyed and skippable like a run's) in a
round of its own under
`<run_dir>/eval/` or `--out`. The checkpoint stands in for the round's train stage.

export: a round's trained policy as a clean Hugging Face directory (weights as
safetensors, config, generation config, tokenizer), nothing of rayalign's bookkeeping.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.config import RoundsConfig, RunConfig
from pipeline.manifest import Manifest, files_digest, model_digest
from pipeline.preflight import check_paths, expand_paths, with_absolute_paths


class UsageError(ValueError):
    """A run directory, round or output path that cannot be used; the CLI exits 2."""


def trained_rounds(run_dir: Path) -> list[int]:
    """Indices of the rounds of `run_dir` whose train stage finished, in order."""
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{run_dir} is not a run directory (no config.yaml)")
    return sorted(int(p.name.removeprefix("round-")) for p in run_dir.glob("round-*")
                  if p.name.removeprefix("round-").isdigit()
                  and Manifest.read(p / "train") is not None)


def round_checkpoint(run_dir: Path, round_index: int | None) -> tuple[int, Path, Manifest]:
    """(round, trained model directory, train manifest) of round K (default: the last
    round that finished training)."""
    done = trained_rounds(run_dir)
    if not done:
        raise UsageError(f"{run_dir}: no round has finished training")
    k = done[-1] if round_index is None else round_index
    if k not in done:
        raise UsageError(f"{run_dir}: round {k} has no finished train stage (trained rounds:"
                         f" {', '.join(map(str, done))})")
    stage_dir = run_dir / f"round-{k}" / "train"
    train = Manifest.read(stage_dir)
    model = Path(train.outputs["model_dir"])  # relative to the stage, or (0 steps) the policy
    return k, model if model.is_absolute() else stage_dir / model, train


def round_reference(run_dir: Path, cfg: RunConfig, round_index: int) -> str:
    """The reference round K's pair metrics were computed against (pipeline.dag: the initial
    model, or with rounds.reference 'previous' round K-1's policy)."""
    if cfg.rounds.reference == "previous" and round_index > 0:
        return str(round_checkpoint(run_dir, round_index - 1)[1])
    return cfg.model.reference_path


# --- eval ---------------------------------------------------------------------------------

def eval_config(cfg: RunConfig) -> RunConfig:
    """The config of an evaluation round: one offline round (it samples and trains nothing)."""
    if not cfg.data.eval:
        raise UsageError("data.eval is empty: eval needs held-out pairs (set data.eval, e.g."
                         " as an override data.eval=[held_out.parquet])")
    return with_absolute_paths(cfg).model_copy(update={"rounds": RoundsConfig()})


def _prepare_eval_inputs(r: Any) -> dict[str, Any]:
    """The key of the eval round's prepare stage: what pipeline.dag's prepare keys on, for
    the eval files only (the training data is neither read nor needed)."""
    from pipeline.data import loss_requires_scores

    cfg = r.cfg
    return {"files": {"eval": files_digest(expand_paths(cfg.data.eval, "data.eval"))},
            "tokenizer": model_digest(cfg.model.tokenizer_path),
            "data": cfg.data.model_dump(exclude={"train"}),
            "requires_scores": loss_requires_scores(cfg.loss)}


def _prepare_eval(r: Any, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    """The eval split through the prepare stage (so the reference stage scores it alone)."""
    from pipeline.dag import console
    from pipeline.stages.prepare import run_prepare

    cfg = r.cfg
    stats = run_prepare(expand_paths(cfg.data.eval, "data.eval"), cfg.model.tokenizer_path,
                        cfg.data, out / "eval", cfg.model.trust_remote_code,
                        requires_scores=inputs["requires_scores"], console=console)
    return {"eval": "eval/pairs.parquet", "eval_stats": stats}


def eval_problems(cfg: RunConfig) -> list[str]:
    """check_paths without what eval does not read (training data, prompts, the policy: the
    evaluated model stands in for it)."""
    skipped = ("data.train", "rounds.prompts", "model.policy")
    return [p for p in check_paths(cfg) if not p.startswith(skipped)]


def adapter_problems(cfg: RunConfig, model_dir: Path) -> list[str]:
    """A LoRA adapter to evaluate needs engines that serve adapters (model.lora) of its rank."""
    from workers.lora import adapter_config, is_adapter, vllm_max_rank

    if not is_adapter(model_dir):
        return []
    rank = adapter_config(model_dir)["r"]
    if cfg.model.lora is None:
        return [(f"model: {model_dir} is a LoRA adapter (rank {rank}): the engines serve"
                 f" adapters only with model.lora set (e.g. the override model.lora={{r: {rank}}})")]
    if rank > vllm_max_rank(cfg.model.lora.r):
        return [(f"model: {model_dir} is a LoRA adapter of rank {rank}, above what engines"
                 f" built for model.lora.r={cfg.model.lora.r} serve: set model.lora.r={rank}")]
    return []


def run_eval(cfg: RunConfig, model_dir: Path, out_root: Path, round_index: int = 0,
             reference: str | None = None, trained: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Evaluate `model_dir` as round `round_index` under `out_root` (stages in
    out_root/round-K/, reference log-probs cached in out_root/cache unless
    reference.cache_dir is set); print the run's evaluation table; return the metrics.

    `reference`: the model of the pair metrics (default the config's reference); `trained`:
    the round's train outputs (pairs trained, training's running mean) when it is a run's."""
    import ray

    from pipeline.cluster import connect, worker_env
    from pipeline.dag import OFFLINE_ROUND, Round, Stage, print_summary, run_stages
    from pipeline.engines import Engines
    from workers.metrics_sink import MetricsSink

    problems = eval_problems(cfg)
    if not model_dir.is_dir():
        problems.append(f"model: {model_dir} is not a directory")
    problems += adapter_problems(cfg, model_dir)
    if problems:
        raise UsageError("; ".join(problems))
    cfg = eval_config(cfg)
    model_dir, out_root = model_dir.resolve(), out_root.resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    info = connect(cfg)
    sink = ray.remote(MetricsSink).options(num_cpus=0).remote(
        str(out_root / "metrics.jsonl"), {"run_dir": str(out_root)})
    engines = Engines(cfg, sink)
    r = Round(cfg, out_root, round_index, str(model_dir), reference or cfg.model.reference_path,
              worker_env(cfg), sink, engines)
    digest = model_digest(str(model_dir))
    outputs = {"num_pairs": "-", **(trained or {}), "model_dir": str(model_dir),
               "model_digest": digest}
    r.done["train"] = Manifest("train", digest, {"model": str(model_dir)}, outputs, 0.0, time.time())
    stages = {s.name: s for s in OFFLINE_ROUND}
    prepare = Stage("prepare", _prepare_eval_inputs, _prepare_eval)
    with engines:
        run_stages(r, [prepare, stages["reference"], stages["evaluate"]])
    ray.get(sink.set_context.remote())  # flush pending metric rows
    print_summary([r], out_root, [], info)
    return r.done["evaluate"].outputs["metrics"]


# --- export -------------------------------------------------------------------------------

# What a Hugging Face model directory needs, and nothing else (no manifests, checkpoints,
# DeepSpeed leftovers, pickles).
WEIGHTS = ("*.safetensors", "model.safetensors.index.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # PEFT's format
MODEL_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")


def _matching(root: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})


def export_round(run_dir: Path, round_index: int | None, out: Path) -> tuple[int, list[str]]:
    """Export round K's trained policy of `run_dir` (default: the last trained round) to
    `out`; returns (K, the exported file names). A LoRA round exports its merged model,
    and its adapter (PEFT format) in out/adapter."""
    k, model_dir, train = round_checkpoint(run_dir, round_index)
    adapter = None
    if "merged_dir" in train.outputs:  # LoRA: the merged model, its adapter in OUT/adapter
        adapter, model_dir = model_dir, run_dir / f"round-{k}" / "train" / train.outputs["merged_dir"]
    tokenizer = None
    if not _matching(model_dir, TOKENIZER_FILES):  # the run's tokenizer, read from its config
        from pipeline.config import load_config

        tokenizer = load_config(run_dir / "config.yaml").model.tokenizer_path
    files = export_model(model_dir, out, tokenizer)
    if adapter is not None:
        (out / "adapter").mkdir()
        for f in _matching(adapter, ADAPTER_FILES):
            shutil.copy2(f, out / "adapter" / f.name)
        files.append("adapter/")
    return k, files


def export_model(model_dir: Path, out: Path, tokenizer_path: str | None = None) -> list[str]:
    """Write a clean HF directory at `out` (created; an existing non-empty one is refused)
    from `model_dir`; the tokenizer comes from `tokenizer_path` when the checkpoint has none.
    A missing generation config is derived from the model config. Returns the file names."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory")
    weights = _matching(model_dir, WEIGHTS)
    if not weights:
        raise UsageError(f"{model_dir} holds no safetensors weights")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in weights + _matching(model_dir, MODEL_FILES + TOKENIZER_FILES):
        shutil.copy2(f, tmp / f.name)
    if not _matching(tmp, TOKENIZER_FILES):
        if tokenizer_path is None:
            raise UsageError(f"{model_dir} holds no tokenizer, and none was given")
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(tmp)
    if not (tmp / "generation_config.json").is_file():
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(tmp)).save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return sorted(p.name for p in out.iterdir())
