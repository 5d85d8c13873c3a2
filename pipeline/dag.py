"""The stage graph of a run: rounds of stages, each stage skippable.

An offline round is prepare → reference → train → evaluate. A sampled round (iterative or
online mode) is sample → score → pair → reference → train → evaluate, starting from the
previous round's policy. `prepare` runs once (in round-0) and later rounds use its eval
split (and its prompts, when rounds.prompts is not set). A round's evaluation runs beside
the next round's stages, up to the next round's own evaluation (BESIDE_EVALUATION).

Each stage's key hashes its inputs (upstream keys, files, model digests) and the config it
reads. A stage whose manifest holds the same key is skipped, so running again, or
`rayalign resume RUN_DIR` after a crash, redoes only unfinished work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich import box
from rich.table import Table

from pipeline.config import (
    ConfigError,
    EngineConfig,
    RunConfig,
    TrainConfig,
    load_config,
    loss_needs,
    needs_sampled_rounds,
)
from pipeline.console import (
    StageDisplay,
    console,
    log_dir_of,
    name_actor_logs,
    quiet_driver,
    report_failure,
)
from pipeline.data import loss_requires_scores
from pipeline.evalstats import Interval, paired_by_key, paired_diff_ci, unit_keys
from pipeline.manifest import (
    Manifest,
    commit,
    files_digest,
    finished,
    model_digest,
    scratch_dir,
    stable_hash,
)
from pipeline.preflight import check_paths, expand_paths, with_absolute_paths


@dataclass
class Round:
    cfg: RunConfig
    run_dir: Path
    index: int
    policy_path: str
    reference_path: str
    env: dict[str, str]
    sink: Any = None
    engines: Any = None  # the run's vLLM engines (pipeline.engines.Engines)
    scorers: Any = None  # the run's reward-model / judge actors (pipeline.scorers.Scorers)
    policy_digest: str | None = None  # known when the policy is an earlier round's output
    carried: tuple[str, Path] | None = None  # (train key, pairs) an earlier round left untrained
    verbose: bool = False  # libraries' and workers' output on the console (else in logs/)
    trainer: Any = None  # the run's pipeline.stages.train.TrainerSession (one fit per run)
    done: dict[str, Manifest] = field(default_factory=dict)
    stage_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.run_dir / f"round-{self.index}"

    @property
    def sampled(self) -> bool:
        """Does this round train on fresh on-policy samples (rather than the given pairs)?
        Round 0 does too when the loss needs what only sampled pairs carry (sppo's win rates)."""
        return self.cfg.rounds.mode != "offline" and (
            self.index > 0 or not self.cfg.data.train or needs_sampled_rounds(self.cfg.loss))

    def stage_path(self, stage: str, output: str) -> Path:
        path = Path(self.done[stage].outputs[output])
        return path if path.is_absolute() else self.stage_dirs[stage] / path

    def has(self, stage: str, output: str) -> bool:
        return stage in self.done and output in self.done[stage].outputs

    def policy_key(self) -> str:
        """Digest of the policy weights this round starts from (hashed once per run)."""
        if self.policy_digest is None:
            self.policy_digest = model_digest(self.policy_path)
        return self.policy_digest

    def train_source(self) -> str:
        """The stage whose `train` pairs this round trains on."""
        return "pair" if self.sampled else "prepare"


@dataclass
class Stage:
    name: str
    key_inputs: Callable[[Round], dict[str, Any]]
    run: Callable[[Round, Path, dict[str, Any]], dict[str, Any]]  # (round, out dir, key inputs)


# --- stage definitions -------------------------------------------------------------------

# a pool config's fields that never change what its engines compute (EngineConfig's)
SCHEDULING_ONLY_ENGINE = {"engine": set(EngineConfig.SCHEDULING_ONLY)}


def _prepare_inputs(r: Round) -> dict[str, Any]:
    cfg = r.cfg
    files = {"train": expand_paths(cfg.data.train, "data.train"),
             "eval": expand_paths(cfg.data.eval, "data.eval")}
    return {"files": {k: files_digest(v) for k, v in files.items()},
            "tokenizer": model_digest(cfg.model.tokenizer_path),
            # min_score_margin only when set: the keys of runs without it stay what they were
            "data": cfg.data.model_dump(exclude=set() if cfg.data.min_score_margin is not None
                                        else {"min_score_margin"}),
            "requires_scores": loss_requires_scores(cfg.loss)}


def _prepare(r: Round, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages.prepare import run_prepare

    cfg = r.cfg
    outputs: dict[str, Any] = {}
    for split, patterns in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        if not patterns:
            continue
        stats = run_prepare(expand_paths(patterns, f"data.{split}"), cfg.model.tokenizer_path,
                            cfg.data, out / split, cfg.model.trust_remote_code,
                            requires_scores=inputs["requires_scores"], console=console,
                            min_score_margin=cfg.data.min_score_margin if split == "train" else None)
        if r.sink is not None:
            r.sink.log.remote("prepare", {"split": split, "pairs": stats["pairs"],
                                          "quarantined": stats["quarantined"],
                                          **({"filtered": stats["filtered"]}
                                             if "filtered" in stats else {})})
        outputs[split] = f"{split}/pairs.parquet"
        outputs[f"{split}_stats"] = stats
    return outputs


def _reference_inputs(r: Round) -> dict[str, Any]:
    """Each split's cache key: the reference weights, tokenizer, that split's data (the eval
    split's is the prepare stage's alone, so an online round reuses it), lengths, dtype."""
    from pipeline.engines import pool_config
    from pipeline.stages.reference import cache_key

    data = r.cfg.data
    kl_pairs = "kl_pairs" in loss_needs(r.cfg.loss)
    sources = {"train": stable_hash([r.done["prepare"].key, r.done[r.train_source()].key]),
               "eval": stable_hash([r.done["prepare"].key, "eval"])}
    keys = {split: cache_key(r.reference_path, r.cfg.model.tokenizer_path, source,
                             {"prompt": data.max_prompt_tokens,
                              "response": data.max_response_tokens,
                              "truncation": data.truncation},
                             pool_config(r.cfg, "reference").engine.dtype,
                             kl_pairs=kl_pairs)
            for split, source in sources.items()}
    return {"cache_keys": keys, "kl_pairs": kl_pairs}


def reference_cache(r: Round) -> Path:
    """Where what the reference computes once is kept: its log-probs of the pairs, and its
    samples of the eval prompts (eval-samples/)."""
    return Path(r.cfg.reference.cache_dir or r.run_dir / "cache" / "reference")


def _reference(r: Round, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages.reference import run_reference

    splits = {}
    if r.has(r.train_source(), "train"):
        splits["train"] = r.stage_path(r.train_source(), "train")
    if r.has("prepare", "eval"):
        splits["eval"] = r.stage_path("prepare", "eval")
    cache_root = reference_cache(r)
    result = run_reference(splits, inputs["cache_keys"], cache_root,
                           lambda: r.engines.client("reference", r.reference_path),
                           r.cfg.reference, kl_pairs=inputs["kl_pairs"])
    console.print("  reference log-probs: " + ", ".join(
        f"{s} {n} {'computed' if s in result['computed'] else 'from cache'}"
        for s, n in result["rows"].items()) + f" ({cache_root})", soft_wrap=True)
    return {**result["paths"], "cache_hit": not result["computed"], "rows": result["rows"]}


def _train_inputs(r: Round) -> dict[str, Any]:
    cfg = r.cfg
    return {"reference": r.done["reference"].key, "policy": r.policy_key(),
            "train": cfg.train.model_dump(exclude=set(TrainConfig.SCHEDULING_ONLY)),
            # only when set: the keys of runs without LoRA stay what they were
            **({"lora": cfg.model.lora.model_dump(exclude={"shared_engine"})}
               if cfg.model.lora else {}),
            "loss": cfg.loss.model_dump(),
            "curriculum": cfg.rounds.curriculum and r.sampled}


def _train(r: Round, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages.train import run_train

    result = run_train(r.stage_path("reference", "train"), r.policy_path, r.cfg, out, r.trainer,
                       shuffle=not inputs["curriculum"], round_index=r.index, carry=r.sampled,
                       key=f"train-{stable_hash(inputs)[:12]}")  # same inputs: resumable
    offered = result.pop("offered", None)  # object references: not for the manifest
    if offered and r.engines is not None:  # keyed on where the stage's commit moves them
        r.engines.offer(str(out / result["model_dir"]), offered,
                        at=str(r.stage_dirs["train"] / result["model_dir"]))
    if result["carried"]:
        result["carry"] = "carry"
    if not result["optimizer_steps"]:
        console.print(f"  trained 0 steps: {result['num_pairs']} pairs are fewer than one global"
                      f" batch ({r.cfg.train.global_batch_size}); they wait for the next round")
        return {**result, "model_digest": r.policy_key()}  # the policy is unchanged
    console.print(f"  trained {result['optimizer_steps']} steps on {result['trained_pairs']} of"
                  f" {result['num_pairs']} pairs"
                  + (f" ({result['nonfinite_skipped']} non-finite batches skipped)"
                     if result["nonfinite_skipped"] else "")
                  + (f"; {result['carried']} wait for the next round" if result["carried"] else ""))
    for stall in result["stalls_survived"]:
        console.print(f"  [yellow]warning[/]: {stall['who']} stalled at step {stall['step']}"
                      f" ({stall['phase']}, {stall['seconds']} s); a restarted group finished")
    # hashed once here; evaluate and the next round key on it
    return {**result, "model_digest": model_digest(str(out / result["model_dir"]))}


def trained_digest(r: Round) -> str:
    """Digest of this round's trained weights (recorded by the train stage)."""
    train = r.done["train"]
    return train.outputs.get("model_digest") or model_digest(str(r.stage_path("train", "model_dir")))


def _evaluate_inputs(r: Round) -> dict[str, Any]:
    from pipeline.engines import pool_config

    cfg = r.cfg
    # the trained weights themselves: a retrained policy is evaluated again
    return {"model": trained_digest(r),
            "reference": r.done["reference"].key,
            "eval": cfg.eval.model_dump(),
            "sampling": cfg.sampling.model_dump(exclude=SCHEDULING_ONLY_ENGINE),
            "reference_engine": pool_config(cfg, "reference").engine.model_dump(
                exclude=set(EngineConfig.SCHEDULING_ONLY)),
            "reward": cfg.reward.model_dump() if cfg.reward else None}


def _evaluate(r: Round, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages.evaluate import run_evaluate

    # Compare with the initial model every round, so KL and win rate add up across rounds.
    metrics = run_evaluate(r.stage_path("reference", "eval"), str(r.stage_path("train", "model_dir")),
                           r.cfg.model.reference_path, r.cfg, out, r.engines,
                           r.done["train"].outputs.get("final_metrics", {}).get("running_mean"),
                           cache=reference_cache(r) / "eval-samples")
    metrics["round"] = r.index
    if r.sink is not None:
        r.sink.log.remote("eval", {**metrics, "stage": "evaluate"})  # (it may run beside)
    return {"metrics": metrics}


def _sample_inputs(r: Round) -> dict[str, Any]:
    cfg = r.cfg
    prompt_files = expand_paths(cfg.rounds.prompts, "rounds.prompts")
    return {"policy": r.policy_key(), "round": r.index,
            "prompts": files_digest(prompt_files) if prompt_files else r.done["prepare"].key,
            "sampling": cfg.sampling.model_dump(exclude=SCHEDULING_ONLY_ENGINE),
            "rounds": cfg.rounds.model_dump(include={"mode", "prompts_per_round", "seed"})}


def _sample(r: Round, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages.sample import prompt_pool, round_prompts, run_sample

    train = r.stage_path("prepare", "train") if r.has("prepare", "train") else None
    prompts = round_prompts(prompt_pool(r.cfg, train), r.cfg, r.index)
    n = run_sample(prompts, r.engines.client("policy", r.policy_path), r.cfg,
                   r.cfg.sampling.seed + r.index, out)
    console.print(f"  {n} samples from {len(prompts)} prompts of policy {r.policy_path}")
    return {"samples": "samples", "prompts": len(prompts), "rows": n,
            "policy_path": r.policy_path, "policy_digest": inputs["policy"]}


def _score_inputs(r: Round) -> dict[str, Any]:
    reward = r.cfg.reward
    return {"sample": r.done["sample"].key, "reward": reward.model_dump(),
            "model": model_digest(reward.model) if reward.model else None}


def _score(r: Round, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages.score import run_score

    stats = run_score(r.stage_path("sample", "samples"), r.cfg, out, r.scorers)
    console.print(f"  scored {stats['samples']} samples: mean {stats['score_mean']:.3f}")
    return {"scored": "scored", **stats}


def _pair_inputs(r: Round) -> dict[str, Any]:
    return {"score": r.done["score"].key,
            "rules": r.cfg.rounds.model_dump(exclude={"count", "prompts", "prompts_per_round"}),
            "carried": r.carried[0] if r.carried else None}


def _pair(r: Round, out: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    from pipeline.stages.pair import run_pair

    counts = run_pair(r.stage_path("score", "scored"), r.cfg, r.cfg.rounds.seed + r.index, out,
                      carried=r.carried[1] if r.carried else None)
    console.print(f"  pairs: {counts}")
    return {"train": "pairs.parquet", "counts": counts}


OFFLINE_ROUND = [
    Stage("prepare", _prepare_inputs, _prepare),
    Stage("reference", _reference_inputs, _reference),
    Stage("train", _train_inputs, _train),
    Stage("evaluate", _evaluate_inputs, _evaluate),
]
SAMPLED_ROUND = [
    Stage("prepare", _prepare_inputs, _prepare),
    Stage("sample", _sample_inputs, _sample),
    Stage("score", _score_inputs, _score),
    Stage("pair", _pair_inputs, _pair),
    *OFFLINE_ROUND[1:],
]


# --- driver ----------------------------------------------------------------------------

def stage_key(name: str, inputs: dict[str, Any]) -> str:
    """The key a stage's manifest must hold for the stage to be skipped."""
    return stable_hash({"stage": name, "inputs": inputs})


def run_stages(r: Round, stages: list[Stage]) -> None:
    for stage in stages:
        run_stage(r, stage)


def run_stage(r: Round, stage: Stage) -> None:
    """Run one stage of round `r`, or skip it when its manifest is up to date."""
    planned = plan_stage(r, stage)
    if planned is not None:
        execute_stage(r, stage, planned)


def plan_stage(r: Round, stage: Stage) -> tuple[dict[str, Any], str] | None:
    """(key inputs, key) of a stage that has to run; None when it is skipped (it does not
    apply, or its manifest holds the key: then it is done)."""
    if stage.name == "evaluate" and not r.cfg.data.eval:
        return None
    if stage.name in r.done:  # inherited from round 0 (prepare)
        return None
    inputs = stage.key_inputs(r)
    key = stage_key(stage.name, inputs)
    stage_dir = r.dir / stage.name
    done = finished(stage_dir, key)
    r.stage_dirs[stage.name] = stage_dir
    if done is not None:
        console.print(f"[green]✓[/] round {r.index} {stage.name}: up to date, skipped")
        r.done[stage.name] = done
        return None
    return inputs, key


def execute_stage(r: Round, stage: Stage, planned: tuple[dict[str, Any], str],
                  beside: int | None = None) -> None:
    """Run a planned stage and commit its manifest. `beside`: the round whose stages run in
    the foreground meanwhile (BESIDE_EVALUATION); such a stage has no live line and leaves
    the sink's round and stage to the foreground's."""
    inputs, key = planned
    label = f"round {r.index} {stage.name}"
    if beside is None:
        if r.sink is not None:
            r.sink.set_context.remote(round=r.index, stage=stage.name)
        display: Any = StageDisplay(label, r.sink, stage.name, r.index)
    else:
        display = contextlib.nullcontext()
    stage_dir = r.stage_dirs[stage.name]
    t0 = time.time()
    tmp = scratch_dir(stage_dir)
    try:
        with display:
            outputs = stage.run(r, tmp, inputs)
    except Exception as err:
        report_failure(err, r.index, stage.name, log_dir_of(r.run_dir), r.verbose)
        raise
    manifest = Manifest(stage.name, key, inputs, outputs, time.time() - t0, time.time())
    commit(tmp, stage_dir, manifest)
    r.done[stage.name] = manifest
    if beside is not None:
        console.print(f"[green]✓[/] {label} ({manifest.seconds:.1f} s, beside round {beside})")


# The stages of a round that run while the previous round's evaluation is still running:
# they ask the engines for the weights that evaluation holds them to (the previous round's
# policy, the initial reference) or for none (score, pair, train). The first stage not
# listed (the round's own evaluation, which loads this round's policy) waits for it.
BESIDE_EVALUATION = ("sample", "score", "pair", "reference", "train")


def beside_evaluation(cfg: RunConfig) -> set[str]:
    """BESIDE_EVALUATION for this config: with `rounds.reference: previous` the reference
    stage loads the previous round's policy into the reference engines, which the
    evaluation holds to the initial model, so it waits."""
    return set(BESIDE_EVALUATION) - ({"reference"} if cfg.rounds.reference == "previous" else set())


def run_pipeline(cfg: RunConfig, verbose: bool = False) -> int:
    """Run every round's stages; `verbose` shows the libraries' and workers' output live
    (else it goes to <run_dir>/logs, see pipeline.console)."""
    from pipeline.plan import check_plan, local_resources, stage_plans

    problems = check_paths(cfg)
    if cfg.ray.address is None:  # a local cluster: its resources are known before it starts
        problems += check_plan(stage_plans(cfg), local_resources(cfg))
    if problems:
        raise ConfigError("; ".join(problems))
    cfg = with_absolute_paths(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    log_dir = log_dir_of(run_dir)
    with quiet_driver(log_dir, verbose):
        return _run_rounds(cfg, run_dir, log_dir, verbose)


def _run_rounds(cfg: RunConfig, run_dir: Path, log_dir: Path, verbose: bool) -> int:
    import ray

    from pipeline.cluster import connect, worker_env
    from pipeline.engines import Engines
    from pipeline.metrics import plot_run
    from pipeline.scorers import Scorers
    from pipeline.stages.train import TrainerSession
    from workers.metrics_sink import MetricsSink
    from workers.tracking import table_data

    started = time.time()
    info = connect(cfg, verbose)
    console.print(f"Ray dashboard: {info['dashboard_url'] or '(not running)'}"
                  + ("" if verbose else f"; logs: {log_dir}"))
    sink = ray.remote(MetricsSink).options(num_cpus=0).remote(
        str((run_dir / "metrics.jsonl").resolve()), {"run_dir": str(run_dir)},
        cfg.tracking.model_dump(), cfg.model_dump(mode="json"))
    env = worker_env(cfg, verbose)
    # the engines, the scorers and one trainer worker group live for the run (each started
    # at first use)
    trainer = TrainerSession(cfg, run_dir / "ray_train", env, sink)
    with Engines(cfg, sink) as engines, Scorers(cfg, sink) as scorers:
        try:
            rounds = _rounds(cfg, run_dir, env, sink, engines, scorers, trainer, verbose)
        except BaseException:
            trainer.close(ok=False)
            raise
        trainer.close()
    ray.get(sink.set_context.remote())  # flush pending metric rows
    plots = plot_run(run_dir)
    name_actor_logs(log_dir)
    table = print_summary(rounds, run_dir, plots, info, since=started)
    ray.get(sink.finish.remote(table_data(table)))  # the trackers get the table, then close
    return 0


def _rounds(cfg: RunConfig, run_dir: Path, env: dict[str, str], sink: Any, engines: Any,
            scorers: Any, trainer: Any, verbose: bool) -> list[Round]:
    """Every round in order. Round k's evaluation runs in a second thread beside round k+1's
    stages up to its first not in BESIDE_EVALUATION; the last round's runs alone."""
    policy = cfg.model.policy
    rounds: list[Round] = []
    may_overlap = beside_evaluation(cfg)
    pending: Future | None = None  # the previous round's evaluation, when it runs beside
    with ThreadPoolExecutor(1, thread_name_prefix="evaluate-beside") as beside:
        try:
            for k in range(cfg.rounds.count):
                reference = policy if cfg.rounds.reference == "previous" else cfg.model.reference_path
                r = Round(cfg, run_dir, k, policy, reference, env, sink, engines, scorers,
                          verbose=verbose, trainer=trainer)
                if rounds:  # prepare ran once, in round 0
                    r.policy_digest = trained_digest(rounds[-1])
                    r.done["prepare"] = rounds[0].done["prepare"]
                    r.stage_dirs["prepare"] = rounds[0].stage_dirs["prepare"]
                if rounds and rounds[-1].has("train", "carry"):
                    r.carried = (rounds[-1].done["train"].key, rounds[-1].stage_path("train", "carry"))
                *stages, evaluate = SAMPLED_ROUND if r.sampled else OFFLINE_ROUND
                for stage in stages:
                    if (pending is not None and stage.name not in may_overlap
                            and stage.name not in r.done):  # (prepare is round 0's)
                        pending, _ = None, pending.result()
                    run_stage(r, stage)
                if pending is not None:
                    pending, _ = None, pending.result()
                planned = plan_stage(r, evaluate)  # a skipped one says so here, in order
                if planned is not None and k + 1 < cfg.rounds.count:
                    console.print(f"  round {k} {evaluate.name}: runs beside round {k + 1}")
                    pending = beside.submit(execute_stage, r, evaluate, planned, k + 1)
                elif planned is not None:
                    execute_stage(r, evaluate, planned)
                rounds.append(r)
                policy = str(r.stage_path("train", "model_dir"))
        finally:
            if pending is not None:  # a foreground stage failed: the evaluation ends first
                wait([pending])
    return rounds


def resume_pipeline(run_dir: Path, verbose: bool = False) -> int:
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    return run_pipeline(load_config(config), verbose)


# The summary's rows: (metric, per-unit file of the evaluate stage and its column for the
# paired test against the previous round, metric holding the interval of the change
# against the reference, and that change's null value). None: no test.
SUMMARY_ROWS = [
    ("eval/loss", None, None, None, None),
    ("eval/rewards/accuracies", "pairs", "reward_accuracy", "eval/rewards/accuracies", 0.5),
    ("eval/rewards/margins", "pairs", "margin", "eval/rewards/margins", 0.0),
    ("eval/ranking/accuracy", "pairs", "ranking", "eval/ranking_gain", 0.0),
    ("eval/ref_ranking_accuracy", None, None, None, None),
    ("eval/kl", "samples", "kl", "eval/kl", 0.0),
    ("eval/gold_policy", "samples", "gold_policy", "eval/gold_gain", 0.0),
    ("eval/gold_reference", None, None, None, None),
    ("eval/gold_gain", None, None, "eval/gold_gain", 0.0),
    ("eval/win_rate", "samples", "win", "eval/win_rate", 0.5),
    ("eval/len_policy", None, None, None, None),
]


def _interval(m: dict[str, Any], key: str) -> Interval | None:
    if key in m and f"{key}_low" in m:
        return Interval(m[key], m[f"{key}_low"], m[f"{key}_high"])
    return None


def _units(r: Round, file: str, column: str) -> dict[Any, float] | None:
    """{unit key (evalstats.unit_keys): value} of one column of a round's evaluate outputs."""
    import pyarrow.parquet as pq

    path = r.stage_dirs.get("evaluate", r.dir / "evaluate") / f"{file}.parquet"
    if not path.is_file():
        return None
    table = pq.read_table(path).to_pydict()
    if column not in table:
        return None
    return dict(zip(unit_keys(file, table), table[column]))


def summary_cell(m: dict[str, Any], key: str, ref_key: str | None, null: float | None,
                 prev: Interval | None) -> str:
    """'0.812 ± 0.041 *†': value ± half-width of its 95% interval; * the change against the
    reference is significant, † the change against the previous round is."""
    if key not in m:
        return "-"
    ci = _interval(m, key)
    text = f"{m[key]:.3f}" + (f" ± {ci.half_width:.3f}" if ci else "")
    ref = _interval(m, ref_key) if ref_key else None
    marks = ("*" if ref is not None and ref.excludes(null) else "") + (
        "†" if prev is not None and prev.excludes(0.0) else "")
    return text + (f" {marks}" if marks else "")


def print_summary(rounds: list[Round], run_dir: Path, plots: list[Path], info: dict[str, Any],
                  since: float | None = None) -> Table:
    """The evaluation table and where things are; with `since` (the driver session's start),
    also what it started and loaded (engines, weight updates, trainers)."""
    from pipeline.metrics import lifecycle_line, read_metrics

    table = Table(title=f"evaluation on held-out data, {run_dir}", box=box.SIMPLE_HEAD, show_edge=False)
    metrics = [r.done["evaluate"].outputs["metrics"] if "evaluate" in r.done else {}
               for r in rounds]
    table.add_column("metric")
    for r in rounds:
        table.add_column(f"round {r.index}", justify="right")
    trained = [r.done["train"].outputs for r in rounds]
    table.add_row("pairs trained", *[f"{t.get('trained_pairs', t['num_pairs'])}"
                                     + (f" (+{t['carried']} wait)" if t.get("carried") else "")
                                     for t in trained])
    for key, file, column, ref_key, null in SUMMARY_ROWS:
        cells = []
        for i, m in enumerate(metrics):
            prev = None
            if i and file and "evaluate" in rounds[i - 1].done and "evaluate" in rounds[i].done:
                before, now = _units(rounds[i - 1], file, column), _units(rounds[i], file, column)
                if before and now:
                    a, b = paired_by_key(before, now)
                    prev = paired_diff_ci(b, a) if a else None
            cells.append(summary_cell(m, key, ref_key, null, prev))
        if any(c != "-" for c in cells):
            table.add_row(key.removeprefix("eval/"), *cells)
    console.print(table)
    console.print("± 95% interval (seeded bootstrap over the eval prompts or pairs); * differs"
                  " from the reference, † from the previous round (paired; see README)",
                  highlight=False)
    if since is not None:
        console.print(f"started:    {lifecycle_line(read_metrics(run_dir / 'metrics.jsonl'), since)}",
                      highlight=False)
    last = rounds[-1]
    if last.has("train", "merged_dir"):  # LoRA: the adapter, and the model it merges into
        console.print(f"adapter:    {last.stage_path('train', 'model_dir')}")
        console.print(f"checkpoint: {last.stage_path('train', 'merged_dir')} (merged)")
    else:
        console.print(f"checkpoint: {last.stage_path('train', 'model_dir')}")
    console.print(f"metrics:    {run_dir / 'metrics.jsonl'}")
    if plots:
        console.print(f"plots:      {', '.join(str(p) for p in plots)}")
    console.print(f"logs:       {log_dir_of(run_dir)}")
    console.print(f"dashboard:  {info['dashboard_url'] or '(not running)'}"
                  f"{' (stops with this local cluster)' if info['started_local'] else ''}")
    return table
