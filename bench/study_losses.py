"""Alignment study (issue 10): does the principled loss keep the logit gap finite and align
better than DPO? Same data, budget and seeds for every loss, on the offline toy world.

    .venv/bin/python bench/study_losses.py            # the full study (~10-15 min, 2 cores)
    .venv/bin/python bench/study_losses.py --quick    # smoke test (< 1 min)

Runs in-process without Ray: the toy model is tiny, so plain torch on CPU is fast. It reuses
the pipeline's code path — `pipeline.data` tokenisation, `workers.train_step.policy_pair_logps`
+ `workers.losses.compute_loss` on a `workers.logprobs.ResponseLogps` model, the trainer's
`lr_lambda`, `pipeline.pairs.build_pairs` and the gold reward `pipeline.toy.reward` — except that
reference log-probs come from an fp32 HF forward of the frozen initial model (not vLLM) and
samples from HF `generate` (not vLLM).

Per arm and seed: offline training on the toy train pairs, recording every step (h, |h − h*|,
log-probs, accuracies on the batch) and, every `--checkpoint-every` steps, the held-out metrics
(gap metrics on eval pairs and on a fixed train subset; samples on held-out prompts: KL to the
reference, gold reward and its parts, win rate, length). Then, for the online arms,
`--online-rounds` rounds of sample → gold-score → pair → train, evaluated after each round.
Writes steps.csv.gz, checkpoints.csv, online.csv, reference.csv, config.json, summary.md and
PNG plots to --out; `--replot DIR` rebuilds summary.md and the plots from those files.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gzip
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import pyarrow.parquet as pq
import torch

from bench.study_data import (
    add_reference,
    data_config,
    load_pairs,
    prompt_rows,
    unique_prompts,
)
from bench.study_sample import (
    SampleSettings,
    checkpoint_metrics,
    generate,
    online_pairs,
    quality_metrics,
)
from bench.study_train import Arm, TrainSettings, gap_metrics, pair_logps, train_steps
from pipeline.config import RoundsConfig
from pipeline.stages.sample import round_prompts
from workers.logprobs import ResponseLogps

BETA = 0.1  # β of every reference-based arm, and of h* = (s_w − s_l)/β for all of them
ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("dpo", "sigmoid", {"beta": BETA}),
    Arm("ipo", "ipo", {"beta": BETA}),
    Arm("principled-scores", "principled", {"beta": BETA, "target": "scores"}),
    Arm("principled-bt", "principled", {"beta": BETA, "target": "bradley_terry"}),
    Arm("principled-constant", "principled", {"beta": BETA, "target": "constant"}),
    Arm("rpo", "rpo", {"beta": BETA, "alpha": 1.0}),
    Arm("simpo", "simpo", {"beta": 2.0, "gamma": 1.0}),
)}
ONLINE_ARMS = ("dpo", "principled-scores")
STEP_KEYS = ("loss", "lr", "grad_norm", "h_mean", "h_std", "h_star_mean", "gap_to_target",
             "frac_past_target", "logp_chosen", "logp_rejected", "logratio_chosen",
             "logratio_rejected", "reward_acc", "ranking_acc")


@dataclass
class StudyConfig:
    world: str = ".toy"
    out: str = "bench/study"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    online_arms: list[str] = field(default_factory=lambda: list(ONLINE_ARMS))
    steps: int = 240
    batch_size: int = 32
    learning_rate: float = 5e-4
    schedule: str = "cosine"            # cosine | linear | constant (after 10% warmup)
    checkpoint_every: int = 24
    train_pairs: int | None = None      # None: all
    eval_pairs: int | None = None
    subset_pairs: int = 128             # fixed train pairs whose h is tracked at checkpoints
    eval_prompts: int = 128             # held-out prompts sampled at each checkpoint
    samples_per_prompt: int = 2
    max_new_tokens: int = 48
    online_rounds: int = 3
    prompts_per_round: int = 256
    online_samples: int = 4
    online_epochs: int = 4
    min_margin: float = 0.05
    threads: int = 2

    @classmethod
    def quick(cls, **overrides: Any) -> StudyConfig:
        base: dict[str, Any] = {
            "out": "/tmp/rayalign-study-quick", "seeds": [0], "arms": ["dpo", "principled-scores"],
            "steps": 12, "batch_size": 16, "checkpoint_every": 6, "train_pairs": 128,
            "eval_pairs": 32, "subset_pairs": 32, "eval_prompts": 16, "online_rounds": 1,
            "prompts_per_round": 32, "online_epochs": 1}
        return cls(**{**base, **overrides})


def own_target(arm: Arm) -> str:
    """The principled target mode an arm is measured against (scores for non-principled arms)."""
    mode = arm.params.get("target", "scores") if arm.loss == "principled" else "scores"
    return "scores" if mode == "auto" else mode


class World:
    """The toy world loaded once: tokenizer, initial model, frozen reference, tokenised data."""

    def __init__(self, cfg: StudyConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        root = Path(cfg.world)
        self.tokenizer = AutoTokenizer.from_pretrained(root / "model")
        self.pad_id = self.tokenizer.pad_token_id
        self.initial = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32,
                                                            use_safetensors=True)
        self.reference = ResponseLogps(copy.deepcopy(self.initial)).eval()
        self.reference.requires_grad_(False)
        dcfg = data_config()
        self.train = add_reference(load_pairs(str(root / "train.parquet"), self.tokenizer, dcfg,
                                              cfg.train_pairs), self.reference, self.pad_id)
        self.eval = add_reference(load_pairs(str(root / "eval.parquet"), self.tokenizer, dcfg,
                                             cfg.eval_pairs), self.reference, self.pad_id)
        self.subset = self.train[:cfg.subset_pairs]
        heldout = [r["prompt"] for r in pq.read_table(root / "prompts.parquet").to_pylist()]
        self.prompts = prompt_rows(heldout[:cfg.eval_prompts], self.tokenizer, dcfg)
        self.pool = prompt_rows(unique_prompts(self.train), self.tokenizer, dcfg)

    def policy(self) -> ResponseLogps:
        return ResponseLogps(copy.deepcopy(self.initial))


def sampling_seed(seed: int) -> int:
    """One sampling seed per study seed, for policy and reference alike (as the evaluate
    stage does), so step 0 reproduces the reference's samples: KL 0, win rate ½."""
    return 1000 + seed


def evaluate(world: World, policy: ResponseLogps, arm: Arm, reference_gold: list[float],
             cfg: StudyConfig, seed: int) -> dict[str, float]:
    """Checkpoint metrics: samples on held-out prompts, gap metrics on eval pairs and on the
    fixed train subset (against the scores target, and the arm's own target)."""
    s = SampleSettings(cfg.samples_per_prompt, cfg.max_new_tokens)
    out = checkpoint_metrics(policy, world.reference, world.tokenizer, world.prompts,
                             reference_gold, s, sampling_seed(seed))
    for split, rows in (("eval", world.eval), ("train", world.subset)):
        logps = pair_logps(policy, rows, world.pad_id)
        out.update({f"{split}/{k}": v for k, v in gap_metrics(logps, BETA).items()})
        own = gap_metrics(logps, BETA, own_target(arm))
        out[f"{split}/own_h_star_mean"] = own["h_star_mean"]
        out[f"{split}/own_gap_to_target"] = own["gap_to_target"]
    return out


def run_arm(world: World, arm: Arm, cfg: StudyConfig, seed: int, reference_gold: list[float],
            results: dict[str, list[dict[str, Any]]]) -> None:
    """Offline training with checkpoints, then the online rounds (online arms only)."""
    tag = {"arm": arm.name, "seed": seed}
    policy = world.policy()
    settings = TrainSettings(cfg.steps, cfg.batch_size, cfg.learning_rate, cfg.schedule)

    def checkpoint(step: int, rnd: int) -> None:
        m = evaluate(world, policy, arm, reference_gold, cfg, seed)
        results["checkpoints"].append({**tag, "round": rnd, "step": step, **m})

    checkpoint(0, 0)
    for rec in train_steps(policy, world.train, arm, settings, seed, world.pad_id, BETA):
        results["steps"].append({**tag, "round": 0, "step": rec["step"],
                                 **{k: rec[k] for k in STEP_KEYS},
                                 "own_gap_to_target": rec.get("loss/principled/gap_to_target")})
        done = rec["step"] + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            checkpoint(done, 0)
    if arm.name not in cfg.online_arms:
        return
    rounds = RoundsConfig(count=cfg.online_rounds + 1, mode="online",
                          prompts_per_round=cfg.prompts_per_round, pair_rule="best_vs_worst",
                          min_margin=cfg.min_margin, seed=seed)
    step = cfg.steps
    for rnd in range(1, cfg.online_rounds + 1):
        prompts = round_prompts(world.pool, SimpleNamespace(rounds=rounds), rnd)
        s = SampleSettings(cfg.online_samples, cfg.max_new_tokens)
        pairs, counts, sample_gold = online_pairs(policy, world.tokenizer, prompts, s, rounds,
                                                  seed * 100 + rnd)
        pairs = add_reference(pairs, world.reference, world.pad_id)
        n_steps = (len(pairs) // cfg.batch_size) * cfg.online_epochs
        if n_steps:
            online = TrainSettings(n_steps, cfg.batch_size, cfg.learning_rate, cfg.schedule)
            for rec in train_steps(policy, pairs, arm, online, seed * 100 + rnd, world.pad_id,
                                   BETA):
                results["steps"].append({**tag, "round": rnd, "step": step + rec["step"],
                                         **{k: rec[k] for k in STEP_KEYS},
                                         "own_gap_to_target":
                                             rec.get("loss/principled/gap_to_target")})
        step += n_steps
        checkpoint(step, rnd)
        results["online"].append({**tag, "round": rnd, "pairs": len(pairs),
                                  "train_steps": n_steps, "sample_gold": sample_gold,
                                  "dropped_ties": counts.get("ties_or_near_ties", 0)})


def run_study(cfg: StudyConfig, log=print) -> dict[str, list[dict[str, Any]]]:
    unknown = sorted(set(cfg.arms + cfg.online_arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {sorted(ARMS)}")
    torch.set_num_threads(cfg.threads)
    world = World(cfg)
    log(f"toy world {cfg.world}: {len(world.train)} train pairs, {len(world.eval)} eval pairs,"
        f" {len(world.prompts)} held-out prompts, {len(world.pool)} online prompts")
    results: dict[str, list[dict[str, Any]]] = {"steps": [], "checkpoints": [], "online": [],
                                                 "reference": []}
    for seed in cfg.seeds:
        s = SampleSettings(cfg.samples_per_prompt, cfg.max_new_tokens)
        ref = quality_metrics(generate(world.reference.lm, world.tokenizer, world.prompts, s,
                                       sampling_seed(seed)))
        results["reference"].append({"seed": seed, **{k: v for k, v in ref.items()
                                                       if not k.startswith("_")}})
        for name in cfg.arms:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            run_arm(world, ARMS[name], cfg, seed, ref["_gold"], results)
            last = results["checkpoints"][-1]
            log(f"seed {seed} {name:20s} {time.perf_counter() - t0:6.1f}s  gold {last['gold']:.3f}"
                f"  KL {last['kl']:.2f}  train h {last['train/h_mean']:.2f}"
                f" (h* {last['train/own_h_star_mean']:.2f})")
    return results


def _open(path: Path, mode: str):
    """Text file, gzip-compressed when the name ends in .gz."""
    return gzip.open(path, mode + "t", newline="") if path.suffix == ".gz" else path.open(
        mode, newline="")


def csv_path(out: Path, name: str) -> Path:
    """steps (one row per optimizer step) is gzipped to keep the repo small; the rest is plain."""
    return out / (f"{name}.csv.gz" if name == "steps" else f"{name}.csv")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with _open(path, "w") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()})


def _value(text: str) -> Any:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_outputs(out: Path) -> tuple[dict[str, list[dict[str, Any]]], StudyConfig, dict[str, Any]]:
    """The results, config and run metadata a previous run wrote to `out` (for --replot)."""
    results: dict[str, list[dict[str, Any]]] = {}
    for name in ("steps", "checkpoints", "online", "reference"):
        path = csv_path(out, name)
        if not path.exists():
            results[name] = []
            continue
        with _open(path, "r") as f:
            results[name] = [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)]
    saved = json.loads((out / "config.json").read_text())
    cfg = StudyConfig(**{**saved.pop("config"), "out": str(out)})
    saved.pop("arms", None)
    return results, cfg, saved


def write_outputs(results: dict[str, list[dict[str, Any]]], cfg: StudyConfig,
                  meta: dict[str, Any]) -> list[Path]:
    from bench.study_report import plot_all, summary_markdown

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in results.items():
        if rows:
            write_csv(rows, csv_path(out, name))
    (out / "config.json").write_text(json.dumps({"config": asdict(cfg), **meta,
                                                 "arms": {a: asdict(ARMS[a]) for a in cfg.arms}},
                                                indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(results, cfg, meta))
    return plot_all(results, cfg, out)


def parse_args(argv: list[str] | None = None) -> StudyConfig | str:
    """The study's config, or the directory to replot (--replot DIR)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test (< 1 min)")
    p.add_argument("--replot", metavar="DIR", default=None,
                   help="only rewrite summary.md and the plots from a finished run's CSVs in DIR")
    d = StudyConfig()
    for f in ("world", "out", "steps", "batch_size", "learning_rate", "schedule",
              "checkpoint_every", "eval_prompts", "online_rounds", "threads"):
        p.add_argument("--" + f.replace("_", "-"), type=type(getattr(d, f)), default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--arms", nargs="+", default=None, choices=sorted(ARMS))
    p.add_argument("--online-arms", nargs="*", default=None, choices=sorted(ARMS))
    args = vars(p.parse_args(argv))
    if args["replot"]:
        return args["replot"]
    args.pop("replot")
    quick = args.pop("quick")
    overrides = {k: v for k, v in args.items() if v is not None}
    return StudyConfig.quick(**overrides) if quick else StudyConfig(**overrides)


def main(argv: list[str] | None = None) -> None:
    import platform

    import transformers

    cfg = parse_args(argv)
    if isinstance(cfg, str):
        results, cfg, meta = read_outputs(Path(cfg))
        paths = write_outputs(results, cfg, meta)
        print("rewrote", ", ".join(str(p) for p in [Path(cfg.out) / "summary.md", *paths]))
        return
    t0 = time.perf_counter()
    results = run_study(cfg)
    meta = {"wall_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": cfg.threads, "command": " ".join(["bench/study_losses.py", *sys.argv[1:]])}
    paths = write_outputs(results, cfg, meta)
    print((Path(cfg.out) / "summary.md").read_text())
    print("wrote", ", ".join(str(p) for p in [Path(cfg.out) / "summary.md", *paths]))


if __name__ == "__main__":
    main()
