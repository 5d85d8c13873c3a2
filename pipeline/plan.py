"""Placement plan: which stage asks for which CPUs/GPUs/custom resources, checked against the
nodes of the cluster.

Stages of a round run one after another, so the cluster must fit the largest stage, not
the sum of all stages. Every unit of a stage (an engine actor, a Ray Train worker) must
fit on one node, so the check packs units onto nodes rather than comparing totals; the
trainers' placement strategy (STRICT_PACK: one node, STRICT_SPREAD: one node each) counts.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from pipeline.config import ActorPoolConfig, RunConfig

# Ray's own per-node bookkeeping resources; not worth showing in a plan.
_HIDDEN_PREFIXES = ("node:", "accelerator_type:", "memory", "object_store_memory")


@dataclass(frozen=True)
class StagePlan:
    stage: str
    what: str
    units: int
    cpus_each: float
    gpus_each: float
    custom: dict[str, float] = field(default_factory=dict)
    strategy: str = "-"

    @property
    def cpus(self) -> float:
        return self.units * self.cpus_each

    @property
    def gpus(self) -> float:
        return self.units * self.gpus_each

    def demand(self) -> dict[str, float]:
        """What one unit asks Ray for (zero amounts left out)."""
        d = {"CPU": self.cpus_each, "GPU": self.gpus_each, **self.custom}
        return {k: v for k, v in d.items() if v > 0}


@dataclass(frozen=True)
class Resources:
    """Total resources of each alive node, and where the numbers came from."""

    nodes: list[dict[str, float]]
    source: str

    @property
    def cpus(self) -> float:
        return sum(n.get("CPU", 0.0) for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.get("GPU", 0.0) for n in self.nodes)

    def custom(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for node in self.nodes:
            for k, v in node.items():
                if k not in ("CPU", "GPU") and not k.startswith(_HIDDEN_PREFIXES):
                    out[k] = out.get(k, 0.0) + v
        return out


def _pool_plan(stage: str, what: str, pool: ActorPoolConfig) -> StagePlan:
    return StagePlan(stage, what, pool.num_actors, pool.cpus_per_actor, pool.gpus_per_actor,
                     dict(pool.resources))


def stage_plans(cfg: RunConfig) -> list[StagePlan]:
    t = cfg.train
    plans = [
        StagePlan("prepare", "Ray Data read/validate/tokenize tasks", 1, 1, 0),
        _pool_plan("reference", "vLLM engine actors (prompt log-probs)", cfg.reference),
        StagePlan("train", f"Ray Train workers, DeepSpeed ZeRO-{t.zero_stage}", t.num_workers,
                  t.cpus_per_worker, t.gpus_per_worker, dict(t.resources), t.placement_strategy),
        _pool_plan("evaluate", "vLLM engine actors (eval samples)", cfg.sampling),
    ]
    if cfg.rounds.mode != "offline":
        plans.insert(3, _pool_plan("sample", "vLLM engine actors (on-policy samples)",
                                   cfg.sampling))
        plans.insert(4, _pool_plan("score", f"reward actors ({cfg.reward.kind})", cfg.reward))
    return plans


def local_resources(cfg: RunConfig) -> Resources:
    """What a local cluster started by `rayalign run` would have (no Ray started)."""
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    node = {"CPU": float(cpus), "GPU": float(_count_local_gpus()), **cfg.ray.resources}
    return Resources([node], "this machine")


def _count_local_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def units_per_node(demand: dict[str, float], node: dict[str, float]) -> int:
    """How many units asking `demand` fit on an empty `node`."""
    fits = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in demand.items()]
    return min(fits) if fits else 10**9


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in resources.items()) or "nothing"


def _why_not(p: StagePlan, have: Resources, per_node: list[int]) -> str | None:
    """Why the stage's units cannot all be placed, or None when they can."""
    missing = [k for k in p.custom if not any(k in n for n in have.nodes)]
    if missing:
        return f"no node has the custom resource(s) {', '.join(map(repr, missing))}"
    if not any(per_node):
        return f"no single node can hold one unit ({_fmt(p.demand())})"
    if p.strategy == "STRICT_PACK" and max(per_node) < p.units:
        return f"STRICT_PACK needs one node for all {p.units}; the best fits {max(per_node)}"
    if p.strategy == "STRICT_SPREAD" and sum(1 for n in per_node if n) < p.units:
        return (f"STRICT_SPREAD needs {p.units} distinct nodes; "
                f"{sum(1 for n in per_node if n)} can hold one")
    if sum(per_node) < p.units:
        return f"the nodes can hold {sum(per_node)} of the {p.units} units at once"
    return None


def check_plan(plans: list[StagePlan], have: Resources) -> list[str]:
    """Stages that can never be scheduled on `have`, each as a clear sentence."""
    problems = []
    for p in plans:
        per_node = [units_per_node(p.demand(), n) for n in have.nodes]
        why = _why_not(p, have, per_node)
        if why:
            custom = f" + {_fmt({k: v * p.units for k, v in p.custom.items()})}" if p.custom else ""
            problems.append(
                f"stage '{p.stage}' needs {p.cpus:g} CPU / {p.gpus:g} GPU{custom} "
                f"({p.units} × {_fmt(p.demand())}) but {have.source} has {have.cpus:g} CPU / "
                f"{have.gpus:g} GPU in {len(have.nodes)} node(s): {why}")
    return problems


def format_plan(plans: list[StagePlan], have: Resources) -> str:
    rows = [("stage", "runs as", "units", "CPU each", "GPU each", "custom each", "placement",
             "CPU", "GPU")]
    rows += [(p.stage, p.what, str(p.units), f"{p.cpus_each:g}", f"{p.gpus_each:g}",
              _fmt(p.custom) if p.custom else "-", p.strategy, f"{p.cpus:g}", f"{p.gpus:g}")
             for p in plans]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    custom = have.custom()
    lines.append(f"cluster: {have.cpus:g} CPU, {have.gpus:g} GPU"
                 f"{', ' + _fmt(custom) if custom else ''} in {len(have.nodes)} node(s)"
                 f" ({have.source}); stages run one at a time, so each must fit alone")
    for i, node in enumerate(have.nodes):
        shown = {k: v for k, v in node.items() if not k.startswith(_HIDDEN_PREFIXES)}
        lines.append(f"  node {i}: {_fmt(shown)}")
    return "\n".join(lines)
