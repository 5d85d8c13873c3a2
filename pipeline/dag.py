"""The stage graph of a round: prepare → reference → train → evaluate, each skippable.

Each stage's key hashes its inputs (upstream keys, files, model digests) and the config it
reads. A stage whose manifest holds the same key is skipped, so running again, or
`rayalign resume RUN_DIR` after a crash, redoes only unfinished work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from rich.console import Console
from rich.table import Table

from pipeline.config import (ConfigError, RunConfig, check_paths, expand_paths, load_config,
                             with_absolute_paths)
from pipeline.manifest import (Manifest, commit, files_digest, finished, model_digest,
                               scratch_dir, stable_hash)

console = Console()


@dataclass
class Round:
    cfg: RunConfig
    run_dir: Path
    index: int
    policy_path: str
    reference_path: str
    env: dict[str, str]
    sink: Any = None
    done: dict[str, Manifest] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.run_dir / f"round-{self.index}"

    def stage_path(self, stage: str, output: str) -> Path:
        value = self.done[stage].outputs[output]
        path = Path(value)
        return path if path.is_absolute() else self.dir / stage / path


@dataclass
class Stage:
    name: str
    key_inputs: Callable[[Round], dict[str, Any]]
    run: Callable[[Round, Path, dict[str, Any]], dict[str, Any]]  # (round, out dir, key inputs)


# --- stage definitions -------------------------------------------------------------------

def _prepare_inputs(r: Round) -> dict[str, Any]:
    cfg = r.cfg
    files = {"train": expand_paths(cfg.data.train, "data.train"),
             "eval": expand_paths(cfg.data.eval, "data.eval")}
    return {"files": {k: files_digest(v) for k, v in files.items()},
            "tokenizer": model_digest(cfg.model.tokenizer_path), "data": cfg.data.model_dump()}


def _prepare(r: Round, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages.prepare import run_prepare

    cfg = r.cfg
    outputs: dict[str, Any] = {}
    for split, patterns in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        if not patterns:
            continue
        stats = run_prepare(expand_paths(patterns, f"data.{split}"), cfg.model.tokenizer_path,
                            cfg.data, out / split, cfg.model.trust_remote_code)
        console.print(f"  {split}: {stats['pairs']} pairs, {stats['quarantined']} quarantined"
                      f" {stats['quarantine_reasons'] or ''}; lengths {stats['lengths']}")
        outputs[split] = f"{split}/pairs.parquet"
        outputs[f"{split}_stats"] = stats
    return outputs


def _reference_inputs(r: Round) -> dict[str, Any]:
    from pipeline.stages.reference import cache_key

    data = r.cfg.data
    key = cache_key(r.reference_path, r.cfg.model.tokenizer_path, r.done["prepare"].key,
                    {"prompt": data.max_prompt_tokens, "response": data.max_response_tokens,
                     "truncation": data.truncation}, r.cfg.reference.engine.dtype)
    return {"cache_key": key}


def _reference(r: Round, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages.reference import run_reference

    prep = r.done["prepare"].outputs
    splits = {s: r.stage_path("prepare", s) for s in ("train", "eval") if s in prep}
    key = inputs["cache_key"]
    cache_root = Path(r.cfg.reference.cache_dir or r.run_dir / "cache" / "reference")
    result = run_reference(splits, key, cache_root, r.reference_path, r.cfg.reference,
                           r.cfg.model.trust_remote_code)
    console.print(f"  reference log-probs {'from cache' if result['cache_hit'] else 'computed'}:"
                  f" {result['rows']} → {result['cache_dir']}")
    outputs = {s: str(Path(result["cache_dir"]) / s) for s in splits}
    return {**outputs, "cache_hit": result["cache_hit"], "rows": result["rows"]}


def _train_inputs(r: Round) -> dict[str, Any]:
    cfg = r.cfg
    return {"reference": r.done["reference"].key, "policy": model_digest(r.policy_path),
            "train": cfg.train.model_dump(), "loss": cfg.loss.model_dump()}


def _train(r: Round, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages.train import run_train

    if r.sink is not None:
        r.sink.set_context.remote(round=r.index, stage="train")
    result = run_train(r.stage_path("reference", "train"), r.policy_path, r.cfg, out,
                       r.run_dir / "ray_train" / f"round-{r.index}", r.env, r.sink)
    console.print(f"  trained {result['optimizer_steps']} steps on {result['num_pairs']} pairs")
    return result


def _evaluate_inputs(r: Round) -> dict[str, Any]:
    cfg = r.cfg
    return {"train": r.done["train"].key, "eval": cfg.eval.model_dump(),
            "sampling": cfg.sampling.model_dump(),
            "reward": cfg.reward.model_dump() if cfg.reward else None}


def _evaluate(r: Round, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages.evaluate import run_evaluate

    metrics = run_evaluate(r.stage_path("reference", "eval"), str(r.stage_path("train", "model_dir")),
                           r.reference_path, r.cfg, out)
    if r.sink is not None:
        r.sink.set_context.remote(round=r.index, stage="evaluate")
        r.sink.log.remote("eval", metrics)
    return {"metrics": metrics}


OFFLINE_ROUND = [
    Stage("prepare", _prepare_inputs, _prepare),
    Stage("reference", _reference_inputs, _reference),
    Stage("train", _train_inputs, _train),
    Stage("evaluate", _evaluate_inputs, _evaluate),
]


# --- driver ----------------------------------------------------------------------------

def run_stages(r: Round, stages: list[Stage]) -> None:
    for stage in stages:
        if stage.name == "evaluate" and not r.cfg.data.eval:
            continue
        inputs = stage.key_inputs(r)
        key = stable_hash({"stage": stage.name, "inputs": inputs})
        stage_dir = r.dir / stage.name
        done = finished(stage_dir, key)
        if done is not None:
            console.print(f"[round {r.index}] {stage.name}: up to date, skipped")
            r.done[stage.name] = done
            continue
        console.print(f"[round {r.index}] {stage.name} ...")
        t0 = time.time()
        tmp = scratch_dir(stage_dir)
        outputs = stage.run(r, tmp, inputs)
        manifest = Manifest(stage.name, key, inputs, outputs, time.time() - t0, time.time())
        commit(tmp, stage_dir, manifest)
        r.done[stage.name] = manifest
        console.print(f"[round {r.index}] {stage.name}: done in {manifest.seconds:.1f}s")


def run_pipeline(cfg: RunConfig) -> int:
    import ray

    from pipeline.cluster import connect, worker_env
    from pipeline.metrics import plot_run
    from workers.metrics_sink import MetricsSink

    problems = check_paths(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    cfg = with_absolute_paths(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    info = connect(cfg)
    console.print(f"Ray dashboard: {info['dashboard_url'] or '(not running)'}")
    sink = ray.remote(MetricsSink).options(num_cpus=0).remote(
        str((run_dir / "metrics.jsonl").resolve()), {"run_dir": str(run_dir)})
    env = worker_env(cfg)
    policy = cfg.model.policy
    rounds = []
    for k in range(cfg.rounds.count):
        r = Round(cfg, run_dir, k, policy, cfg.model.reference_path, env, sink)
        run_stages(r, OFFLINE_ROUND)
        rounds.append(r)
        policy = str(r.stage_path("train", "model_dir"))
    ray.get(sink.set_context.remote())  # flush pending metric rows
    plots = plot_run(run_dir)
    print_summary(rounds, run_dir, plots, info)
    return 0


def resume_pipeline(run_dir: Path) -> int:
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    return run_pipeline(load_config(config))


def print_summary(rounds: list[Round], run_dir: Path, plots: list[Path], info: dict[str, Any]) -> None:
    table = Table(title=f"rayalign run {run_dir}: evaluation on held-out data")
    keys = ["eval/loss", "eval/rewards/accuracies", "eval/rewards/margins",
            "eval/ranking/accuracy", "eval/ref_ranking_accuracy", "eval/kl",
            "eval/gold_policy", "eval/gold_reference", "eval/win_rate", "eval/len_policy"]
    metrics = [r.done["evaluate"].outputs["metrics"] if "evaluate" in r.done else {}
               for r in rounds]
    table.add_column("metric")
    for r in rounds:
        table.add_column(f"round {r.index}", justify="right")
    for k in keys:
        table.add_row(k.removeprefix("eval/"), *[f"{m[k]:.3f}" if k in m else "-" for m in metrics])
    console.print(table)
    last = rounds[-1]
    console.print(f"checkpoint: {last.stage_path('train', 'model_dir')}")
    console.print(f"metrics:    {run_dir / 'metrics.jsonl'}")
    for p in plots:
        console.print(f"plot:       {p}")
    console.print(f"dashboard:  {info['dashboard_url'] or '(not running)'}"
                  f"{' (stops with this local cluster)' if info['started_local'] else ''}")
