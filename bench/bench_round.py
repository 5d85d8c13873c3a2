"""Round overhead: the wall time of a whole demo round split by stage, and the share of it
spent outside model compute (Ray start, scheduling, Ray Train start, parquet I/O, engine
start, export), so that overhead is visible and can be driven down.

Runs the real driver (`pipeline.dag.run_pipeline`) on `configs/demo.yaml` (the toy world)
with a fresh run directory under `.cache/bench/round/` and `rounds.count` rounds (default
1: the offline round prepare -> reference -> train -> evaluate; `--rounds 2` adds the online
round sample -> score -> pair -> reference -> train -> evaluate). The vLLM UDFs are timed
from inside their actors (`common.timed_vllm_udfs`), training steps from `metrics.jsonl`
(each step's own compute time is what the trainer reports as pairs/s; the wall between
steps adds `ray.train.report`), stages from their manifests (`seconds`).

Model compute = vLLM engine calls (prompt log-probs, sampling) + training steps (median
step compute x steps). Everything else in the round's wall is overhead.

    .venv/bin/python bench/bench_round.py [--config configs/demo.yaml] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from common import (
    CACHE,
    ROOT,
    emit,
    ensure_toy,
    line,
    machine,
    read_timings,
    set_env,
    timed_vllm_udfs,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_round(config: Path, rounds: int) -> tuple[Path, float, float]:
    import ray

    from pipeline.cluster import connect
    from pipeline.config import load_config
    from pipeline.dag import run_pipeline

    run_dir = CACHE / "round" / time.strftime("run-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    cfg = load_config(config, {"run_dir": str(run_dir), "rounds.count": rounds,
                               "ray.dashboard_port": free_port(),
                               "reference.cache_dir": str(run_dir / "cache" / "reference")})
    t0 = time.time()
    with timed_vllm_udfs(run_dir / "timings.jsonl"):
        connect(cfg)  # what run_pipeline would do first; it then reuses this cluster
        ray_start = time.time() - t0
        try:
            run_pipeline(cfg)
        finally:
            ray.shutdown()
    return run_dir, ray_start, time.time() - t0


def stage_table(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for manifest in sorted(run_dir.glob("round-*/*/manifest.json")):
        m = json.loads(manifest.read_text())
        out.append({"round": int(manifest.parent.parent.name.split("-")[1]), "stage": m["stage"],
                    "seconds": m["seconds"], "end": m["finished_at"],
                    "start": m["finished_at"] - m["seconds"], "outputs": m["outputs"]})
    return sorted(out, key=lambda s: s["start"])


def split_stage(stage: dict[str, Any], timings: list[dict[str, Any]],
                train_rows: list[dict[str, Any]]) -> dict[str, float]:
    """Model compute and named overheads inside one stage's wall."""
    inside = [t for t in timings if stage["start"] <= t["start"] <= stage["end"]]
    # A UDF (PairLogprobs, Sampler) constructs and calls an Engine in its own process: count
    # the UDF's records there, and Engine records only from bare Engine actors (evaluate).
    udf_pids = {t["pid"] for t in inside if t["cls"] != "Engine"}
    inside = [t for t in inside if t["cls"] != "Engine" or t["pid"] not in udf_pids]
    parts: dict[str, float] = {}
    inits = [t for t in inside if t["what"] == "init"]
    if inits:
        parts["engine start (UDF / Engine constructors)"] = sum(t["s"] for t in inits)
    calls = [t for t in inside if t["what"] != "init"]
    if calls:
        parts["model compute (vLLM calls)"] = sum(t["s"] for t in calls)
    rows = [r for r in train_rows if stage["start"] <= r["time"] <= stage["end"]]
    if stage["stage"] == "train" and rows:
        per_step = [r["pairs_per_s"] for r in rows]
        pairs = stage["outputs"]["num_pairs"] // max(1, stage["outputs"]["optimizer_steps"])
        step_s = statistics.median(pairs / p for p in per_step[1:] or per_step)
        compute = step_s * len(rows)
        parts["Ray Train start to first step"] = rows[0]["time"] - stage["start"] - step_s
        parts["model compute (train steps)"] = compute
        parts["between steps (ray.train.report etc.)"] = (rows[-1]["time"] - rows[0]["time"]
                                                          - step_s * (len(rows) - 1))
        parts["export + teardown after last step"] = stage["end"] - rows[-1]["time"]
    parts["rest (scheduling, Ray Data, parquet I/O, driver)"] = stage["seconds"] - sum(parts.values())
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--run-dir", type=Path, help="report on a finished bench run, do not run")
    args = ap.parse_args()
    set_env()
    ensure_toy()
    if args.run_dir:
        run_dir, ray_start, wall = args.run_dir, float("nan"), float("nan")
    else:
        run_dir, ray_start, wall = run_round(args.config, args.rounds)
        (run_dir / "bench.json").write_text(json.dumps({"ray_start": ray_start, "wall": wall}))
    saved = json.loads((run_dir / "bench.json").read_text())
    ray_start, wall = saved["ray_start"], saved["wall"]
    timings = read_timings(run_dir / "timings.jsonl")
    train_rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in train_rows if r.get("kind") == "train"]
    stages = stage_table(run_dir)
    emit(line("machine", machine()),
         line("run", f"{args.config.name}, {args.rounds} round(s), run dir {run_dir}"))
    compute = 0.0
    staged = 0.0
    for st in stages:
        parts = split_stage(st, timings, train_rows)
        staged += st["seconds"]
        compute += sum(v for k, v in parts.items() if k.startswith("model compute"))
        emit(line(f"round {st['round']} {st['stage']}", st["seconds"], "s"))
        for k, v in parts.items():
            emit(line(f"  {st['stage']}: {k}", v, "s"))
    emit(line("Ray start (ray.init with dashboard)", ray_start, "s"),
         line("driver outside stages and Ray start (imports, plots, summary, shutdown)",
              wall - staged - ray_start, "s"),
         line("whole run wall", wall, "s"),
         line("model compute", compute, "s"))
    share = 1 - compute / wall
    emit(f"share of the round outside model compute: {share:.1%} "
         f"(target < 10%: {'met' if share < 0.10 else 'missed'})")


if __name__ == "__main__":
    main()
