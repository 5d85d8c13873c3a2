"""Placement plan: which stage asks for which CPUs/GPUs, checked against what the cluster has.

Stages of a round run one after another, so the cluster must fit the largest stage, not
the sum of all stages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from pipeline.config import RunConfig


@dataclass(frozen=True)
class StagePlan:
    stage: str
    what: str
    units: int
    cpus_each: float
    gpus_each: float

    @property
    def cpus(self) -> float:
        return self.units * self.cpus_each

    @property
    def gpus(self) -> float:
        return self.units * self.gpus_each


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float
    source: str


def stage_plans(cfg: RunConfig) -> list[StagePlan]:
    plans = [
        StagePlan("prepare", "Ray Data read/validate/tokenize tasks", 1, 1, 0),
        StagePlan("reference", "vLLM engine actors (prompt log-probs)", cfg.reference.num_actors,
                  cfg.reference.cpus_per_actor, cfg.reference.gpus_per_actor),
        StagePlan("train", f"Ray Train workers, DeepSpeed ZeRO-{cfg.train.zero_stage}",
                  cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.gpus_per_worker),
        StagePlan("evaluate", "vLLM engine actors (eval samples)", cfg.sampling.num_actors,
                  cfg.sampling.cpus_per_actor, cfg.sampling.gpus_per_actor),
    ]
    if cfg.rounds.mode != "offline":
        plans.insert(3, StagePlan("sample", "vLLM engine actors (on-policy samples)",
                                  cfg.sampling.num_actors, cfg.sampling.cpus_per_actor,
                                  cfg.sampling.gpus_per_actor))
        plans.insert(4, StagePlan("score", f"reward: {cfg.reward.kind if cfg.reward else '-'}",
                                  1, 1, 0))
    return plans


def local_resources(cfg: RunConfig) -> Resources:
    """What a local cluster started by `rayalign run` would have (no Ray started)."""
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    return Resources(float(cpus), float(_count_local_gpus()), "this machine")


def _count_local_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def check_plan(plans: list[StagePlan], have: Resources) -> list[str]:
    """Stages that can never be scheduled on `have`, each as a clear sentence."""
    problems = []
    for p in plans:
        if p.cpus > have.cpus or p.gpus > have.gpus:
            problems.append(
                f"stage '{p.stage}' needs {p.cpus:g} CPU / {p.gpus:g} GPU "
                f"({p.units} × {p.cpus_each:g} CPU, {p.gpus_each:g} GPU) but {have.source} has "
                f"{have.cpus:g} CPU / {have.gpus:g} GPU"
            )
    return problems


def format_plan(plans: list[StagePlan], have: Resources) -> str:
    rows = [("stage", "runs as", "units", "CPU each", "GPU each", "CPU", "GPU")]
    rows += [(p.stage, p.what, str(p.units), f"{p.cpus_each:g}", f"{p.gpus_each:g}",
              f"{p.cpus:g}", f"{p.gpus:g}") for p in plans]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"cluster: {have.cpus:g} CPU, {have.gpus:g} GPU ({have.source}); stages run one"
                 " at a time, so each must fit alone")
    return "\n".join(lines)
