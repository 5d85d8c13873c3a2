"""Rounds at the speed of their compute: a many-round online run on the toy world, today's
design against the per-stage design it replaced, in the same run.

Each design runs the real driver (`pipeline.dag.run_pipeline`) on `configs/demo.yaml` with
`rounds.count` rounds of `rounds.prompts_per_round` prompts (defaults 10 and 32), in a
child process of its own with a fresh local Ray cluster and run directory under
`.cache/bench/round/`. This checkout's HEAD is "ours"; the baseline is the same program at
`--baseline` (a git revision, default BASELINE: the last commit whose stages each started
their own vLLM engines and trainers); each design's commit is extracted with `git archive`
and run from there with the same venv.

Inside the child the vLLM engine class is swapped for a timed subclass
(`harness.timed_vllm_udfs`): engine starts, calls and weight updates are timed inside the
engine actors; training steps come from `metrics.jsonl`, stages from their manifests.

Model compute = vLLM engine calls (prompt log-probs, sampling) + training steps (median
step compute x steps). A round's wall runs from its first stage's start to its last
stage's end; a round's evaluation runs beside the next round's stages, so rounds overlap.
The steady-state share is over the span of rounds >= 2 (first stage start to last stage
end): the time in it during which some model compute runs (the union of the compute
intervals: engines computing side by side count once), over its length.

`--also REV` runs a second commit of today's design in the same run (e.g. the one before a
change), analysed the same way, and prints the ratio of the steady rounds' period.

    .venv/bin/python bench/bench_round.py [--rounds 10] [--prompts-per-round 32]
        [--baseline REV | --baseline none] [--also REV] [--config configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fixtures import CACHE, ROOT, ensure_toy, set_env
from harness import emit, line, machine, ratio_line, read_timings

BASELINE = "30b3ead"  # stages start their own engines; a Ray Train fit per round


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(config: Path, run_dir: Path, rounds: int, prompts: int) -> None:
    """Runs inside the child process: one timed run of the driver."""
    import ray
    from harness import timed_vllm_udfs

    from pipeline.config import load_config
    from pipeline.dag import run_pipeline

    cfg = load_config(config, {"run_dir": str(run_dir), "rounds.count": rounds,
                               "rounds.prompts_per_round": prompts,
                               "ray.dashboard_port": free_port(),
                               "reference.cache_dir": str(run_dir / "cache" / "reference")})
    with timed_vllm_udfs(run_dir / "timings.jsonl"):
        try:
            run_pipeline(cfg)
        finally:
            ray.shutdown()


def code_root(rev: str) -> tuple[str, Path]:
    """(commit, the tree of `rev` extracted under .cache/bench/round/code-COMMIT): each design
    runs from its own copy, so editing the checkout during a run cannot change its code
    (Ray workers import their modules when they start, mid-run)."""
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    out = CACHE / "round" / f"code-{rev}"
    if not (out / "pipeline").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
        (out / ".toy").symlink_to(ROOT / ".toy")  # the config's relative paths
    return rev, out


def design_config(config: Path, root: Path) -> Path:
    """A config of this checkout as the design's own commit has it (the config names code,
    such as the toy world's reward functions, that moved between commits); a config from
    outside the checkout is run as it is by both."""
    config = config.resolve()
    return root / config.relative_to(ROOT) if config.is_relative_to(ROOT) else config


def run_design(name: str, root: Path, config: Path, rounds: int, prompts: int,
               engine_in_udf: bool = False) -> dict[str, Any]:
    run_dir = CACHE / "round" / time.strftime(f"{name}-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "bench")])}
    t0 = time.time()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        subprocess.run([sys.executable, __file__, "--child", str(config), str(run_dir),
                        str(rounds), str(prompts)], env=env, cwd=root, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    return {"name": name, "run_dir": run_dir, "wall": time.time() - t0,
            "engine_in_udf": engine_in_udf}


def stage_table(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for manifest in sorted(run_dir.glob("round-*/*/manifest.json")):
        m = json.loads(manifest.read_text())
        out.append({"round": int(manifest.parent.parent.name.split("-")[1]), "stage": m["stage"],
                    "seconds": m["seconds"], "end": m["finished_at"],
                    "start": m["finished_at"] - m["seconds"], "outputs": m["outputs"]})
    return sorted(out, key=lambda s: s["start"])


def train_compute(stage: dict[str, Any], rows: list[dict[str, Any]]) -> float:
    """Median step compute x steps of one train stage (pairs/s as the trainer reports it)."""
    rows = [r for r in rows if stage["start"] <= r["time"] <= stage["end"]]
    if not rows or not stage["outputs"].get("optimizer_steps"):
        return 0.0
    pairs = stage["outputs"]["trained_pairs"] // stage["outputs"]["optimizer_steps"]
    per_step = [r["pairs_per_s"] for r in rows]
    return statistics.median(pairs / p for p in per_step[1:] or per_step) * len(rows)


COMPUTE_CALLS = ("sequence_logprobs", "sample", "sequence_collisions")  # engine methods


def train_intervals(stage: dict[str, Any], rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, end) of each training step of one train stage: its row's time (the step's
    end) less the median step compute (train_compute's)."""
    rows = [r for r in rows if stage["start"] <= r["time"] <= stage["end"]]
    if not rows or not stage["outputs"].get("optimizer_steps"):
        return []
    per_step = train_compute(stage, rows) / len(rows)
    return [(r["time"] - per_step, r["time"]) for r in rows]


def covered(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of `intervals` inside [lo, hi]."""
    total, end = 0.0, lo
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def engine_timings(timings: list[dict[str, Any]], engine_in_udf: bool) -> list[dict[str, Any]]:
    """The records of engine work: the Engine's own; in the per-stage design (an engine
    inside each Ray Data UDF, whose Engine records are not written), a UDF's records stand
    for its engine's (its start, and its batches: engine compute plus a little overhead,
    which counts in the baseline's favour)."""
    engines = [t for t in timings if t["cls"] == "Engine"]
    if not engine_in_udf:
        return engines
    pids = {t["pid"] for t in engines}
    udf = [{**t, "what": "init" if t["what"] == "init" else "sample"} for t in timings
           if t["cls"] != "Engine" and t["pid"] not in pids]
    return engines + udf


def analyse(design: dict[str, Any]) -> dict[str, Any]:
    run_dir = design["run_dir"]
    timings = engine_timings(read_timings(run_dir / "timings.jsonl"), design["engine_in_udf"])
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in metrics if r.get("kind") == "train"]
    stages = stage_table(run_dir)
    rounds: dict[int, dict[str, Any]] = {}
    for st in stages:
        r = rounds.setdefault(st["round"], {"start": st["start"], "end": st["end"], "compute": 0.0})
        r["start"], r["end"] = min(r["start"], st["start"]), max(r["end"], st["end"])
        if st["stage"] == "train":
            r["compute"] += train_compute(st, train_rows)
            r["pairs"] = st["outputs"].get("trained_pairs", st["outputs"]["num_pairs"])
    intervals = [(t["start"], t["start"] + t["s"]) for t in timings if t["what"] in COMPUTE_CALLS]
    for st in stages:
        if st["stage"] == "train":
            intervals += train_intervals(st, train_rows)
    for t in timings:
        if t["what"] in COMPUTE_CALLS:  # in the round of its stage (rounds overlap)
            owner = [st["round"] for st in stages if st["start"] <= t["start"] <= st["end"]]
            if owner:
                rounds[min(owner)]["compute"] += t["s"]
    trainer_rows = [r for r in metrics if r.get("kind") == "lifecycle"
                    and r.get("event") == "trainer_start"]
    fits = len(trainer_rows) or sum(1 for st in stages if st["stage"] == "train"
                                    and st["outputs"].get("optimizer_steps"))
    # per engine: the lifecycle rows (how each update came: object store or disk), or where a
    # design writes none, the timed update_weights calls
    lifecycle = [r for r in metrics if r.get("kind") == "lifecycle"
                 and r.get("event") == "weight_update" and "adapter_slot" not in r]
    updates = ([(r.get("via", "disk"), r["seconds"]) for r in lifecycle] if lifecycle else
               [("disk", t["s"]) for t in timings if t["what"] == "update_weights"])
    steady = [st for st in stages if st["round"] >= 2]
    span = ((min(st["start"] for st in steady), max(st["end"] for st in steady))
            if steady else (0.0, 0.0))
    per_stage: dict[str, list[float]] = {}
    for st in stages:
        if st["round"] >= 2:
            per_stage.setdefault(st["stage"], []).append(st["seconds"])
    return {**design, "rounds": rounds,
            "steady_stages": {k: statistics.median(v) for k, v in per_stage.items()},
            "engine_starts": sum(1 for t in timings if t["what"] == "init"),
            "trainer_starts": fits, "updates": updates,
            "steady_share": (covered(intervals, *span) / (span[1] - span[0])
                             if steady else float("nan")),
            "steady_period": ((span[1] - span[0]) / len({st["round"] for st in steady})
                              if steady else float("nan")),
            "compute": sum(r["compute"] for r in rounds.values())}


def report(d: dict[str, Any]) -> None:
    name = d["name"]
    emit(line(f"{name}: run dir", str(d["run_dir"])), line(f"{name}: whole run wall", d["wall"], "s"),
         line(f"{name}: model compute", d["compute"], "s"),
         line(f"{name}: engine starts", str(d["engine_starts"])),
         line(f"{name}: trainer worker-group starts", str(d["trainer_starts"])))
    for k, r in sorted(d["rounds"].items()):
        emit(line(f"{name}: round {k} wall / compute / pairs trained",
                  f"{r['end'] - r['start']:.1f} s / {r['compute']:.1f} s / {r.get('pairs', 0)}"))
    if d["steady_stages"]:
        emit(line(f"{name}: steady-state stage medians (s)", ", ".join(
            f"{k} {v:.2f}" for k, v in d["steady_stages"].items())))
    for via in sorted({v for v, _ in d["updates"]}):
        seconds = [s for v, s in d["updates"] if v == via]
        emit(line(f"{name}: weight update per engine from {via} (median of {len(seconds)})",
                  statistics.median(seconds), "s"))
    emit(line(f"{name}: steady-state round period (span of rounds >= 2 / their count)",
              d["steady_period"], "s"))
    emit(f"{name}: steady-state rounds (>= 2) share of wall in model compute:"
         f" {d['steady_share']:.1%} (target >= 75%: {'met' if d['steady_share'] >= 0.75 else 'missed'})")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        config, run_dir, rounds, prompts = sys.argv[2:6]
        return child(Path(config), Path(run_dir), int(rounds), int(prompts))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--prompts-per-round", type=int, default=32)
    ap.add_argument("--baseline", default=BASELINE, help="git revision, or 'none'")
    ap.add_argument("--also", help="a second commit of today's design, run the same way")
    args = ap.parse_args()
    set_env()
    ensure_toy()
    emit(line("machine", machine()),
         line("run", f"{args.config.name}, {args.rounds} online rounds of"
                     f" {args.prompts_per_round} prompts"))
    rev, root = code_root("HEAD")
    emit(line("ours", f"commit {rev} (HEAD; uncommitted changes are not run)"))
    ours = analyse(run_design("ours", root, design_config(args.config, root), args.rounds,
                              args.prompts_per_round))
    report(ours)
    if args.also:
        rev, root = code_root(args.also)
        also = analyse(run_design(f"also-{rev}", root, design_config(args.config, root),
                                  args.rounds, args.prompts_per_round))
        report(also)
        emit(ratio_line(f"steady round period, {rev} / ours", also["steady_period"],
                        ours["steady_period"]))
    if args.baseline != "none":
        rev, root = code_root(args.baseline)
        base = analyse(run_design(f"baseline-{rev}", root, design_config(args.config, root),
                                  args.rounds, args.prompts_per_round, engine_in_udf=True))
        report(base)
        emit(ratio_line(f"whole-run wall, baseline {args.baseline} / ours", base["wall"],
                        ours["wall"], target=5))


if __name__ == "__main__":
    main()
