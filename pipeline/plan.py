"""Placement plan: which stage asks for which CPUs/GPUs/custom resources, checked against the
nodes of the cluster.

The vLLM engine pools (pipeline.engines) and the trainer's worker group
(pipeline.stages.train) live for the whole run, so they are placed together first and hold
their share of the nodes throughout; the other stages run one after another, each in what
those leave, and each must leave a CPU for Ray Data's
own tasks (reads, writes, maps), which otherwise wait forever without an error. Every unit
(an engine actor, a Ray Train worker) must fit on one node, so the check packs units onto
nodes rather than comparing totals; the trainers' placement strategy (STRICT_PACK: one
node, STRICT_SPREAD: one node each) counts.
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
    resident: bool = False  # holds its resources for the whole run (engine pools, trainer)
    is_ray_data: bool = False  # its units are Ray Data's own tasks (no CPU to leave beside them)

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


RAY_DATA_CPUS = 1.0  # what a stage must leave free on some node for Ray Data's own tasks


def _pool_plan(stage: str, what: str, pool: ActorPoolConfig, resident: bool = False) -> StagePlan:
    return StagePlan(stage, what, pool.num_actors, pool.cpus_per_actor, pool.gpus_per_actor,
                     dict(pool.resources), resident=resident)


def stage_plans(cfg: RunConfig) -> list[StagePlan]:
    t, lora = cfg.train, cfg.model.lora
    shared = lora is not None and lora.shared_engine
    uses = "evaluate" + (", sample" if cfg.rounds.mode != "offline" else "")
    engines = [
        _pool_plan("policy", f"vLLM engines with LoRA, for the run (the base as reference;"
                   f" the adapters as policy: {uses})", cfg.sampling, resident=True)
    ] if shared else [
        _pool_plan("reference", "vLLM reference engines, for the run (reference, evaluate)",
                   cfg.reference, resident=True),
        _pool_plan("policy", f"vLLM policy engines{' with LoRA' if lora else ''}, for the run"
                   f" ({uses})", cfg.sampling, resident=True),
    ]
    plans = [
        *engines,
        StagePlan("prepare", "Ray Data read/validate/tokenize tasks", 1, 1, 0, is_ray_data=True),
        StagePlan("train", "Ray Train workers, DeepSpeed "
                  + ("ZeRO auto (0 or 3, decided on the workers)" if t.zero_stage == "auto"
                     else f"ZeRO-{t.zero_stage}") + ", for the run",
                  t.num_workers, t.cpus_per_worker, t.gpus_per_worker, dict(t.resources),
                  t.placement_strategy, resident=True),
    ]
    if cfg.rounds.mode != "offline":
        at = len(engines) + 1  # after prepare
        if cfg.reward.kind == "function":
            plans.insert(at, _pool_plan("score", "reward function tasks", cfg.reward))
        else:  # a reward model / judge: actors for the run (pipeline.scorers)
            plans.insert(at, _pool_plan("score", f"{cfg.reward.kind} scorer actors, for the run",
                                        cfg.reward, resident=True))
    return plans


def local_resources(cfg: RunConfig) -> Resources:
    """What a local cluster started by `rayalign run` would have (no Ray started)."""
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    node = {"CPU": float(cpus), "GPU": float(_count_local_gpus()), **cfg.ray.resources}
    return Resources([node], "this machine")


def available_resources(cfg: RunConfig) -> tuple[Resources | None, list[str]]:
    """This machine's resources (a local cluster), or the nodes of the cluster at
    ray.address (queried); None and the problem when the cluster cannot be asked."""
    if cfg.ray.address is None:
        return local_resources(cfg), []
    from pipeline.cluster import cluster_nodes

    try:
        return Resources(cluster_nodes(cfg.ray.address), f"cluster at {cfg.ray.address}"), []
    except (ConnectionError, RuntimeError, ValueError) as err:  # reported, not raised
        return None, [f"ray.address: cannot query the cluster at {cfg.ray.address}: {err}"]


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


def take(p: StagePlan, free: list[dict[str, float]]) -> bool:
    """Place p's units on the nodes' `free` resources (taken from them); False if they do not fit."""
    demand = p.demand()
    roomiest = lambda fits: max(fits, key=lambda i: free[i].get("CPU", 0.0), default=None)
    used: set[int] = set()
    for _ in range(p.units):
        if p.strategy == "STRICT_PACK":  # every unit on the first unit's node
            fits = list(used) or [i for i, n in enumerate(free)
                                  if units_per_node(demand, n) >= p.units]
        else:  # each unit on the node with the most CPU left (room for Ray Data stays spread)
            fits = [i for i, n in enumerate(free) if units_per_node(demand, n) >= 1
                    and not (p.strategy == "STRICT_SPREAD" and i in used)]
        i = roomiest(fits)
        if i is None:
            return False
        used.add(i)
        for k, v in demand.items():
            free[i][k] = free[i].get(k, 0.0) - v
    return True


def run_footprint(plans: list[StagePlan]) -> list[StagePlan]:
    """What one run holds at its busiest, for placing runs side by side (a sweep): what lives
    for the run, its largest other stage, and a CPU for Ray Data's tasks."""
    resident = [p for p in plans if p.resident]
    others = [p for p in plans if not p.resident and not p.is_ray_data]
    room = StagePlan("ray data", "Ray Data's own tasks", 1, RAY_DATA_CPUS, 0, is_ray_data=True)
    return [*resident, *([max(others, key=lambda p: p.cpus)] if others else []), room]


def _ray_data_room(free: list[dict[str, float]]) -> bool:
    return any(n.get("CPU", 0.0) >= RAY_DATA_CPUS - 1e-9 for n in free)


def check_plan(plans: list[StagePlan], have: Resources) -> list[str]:
    """Stages that can never be scheduled on `have`, each as a clear sentence: alone on the
    cluster, and then beside the engines that live for the run."""
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
    if problems:
        return problems
    # the most constrained first (custom resources, strict strategies, GPUs, size)
    resident = sorted((p for p in plans if p.resident), reverse=True, key=lambda p: (
        bool(p.custom), p.strategy.startswith("STRICT"), p.gpus_each, p.cpus))
    held = " + ".join(f"{p.stage} {p.units} × {_fmt(p.demand())}" for p in resident)
    free = [dict(n) for n in have.nodes]
    if not all(take(p, free) for p in resident) or not _ray_data_room(free):
        return [(f"what lives for the run ({held}) does not fit {have.source}"
                 f" ({have.cpus:g} CPU / {have.gpus:g} GPU in {len(have.nodes)} node(s)) with"
                 f" {RAY_DATA_CPUS:g} CPU left for Ray Data's tasks: fewer or smaller engine"
                 f" actors or trainers (reference/sampling num_actors, cpus_per_actor;"
                 f" train num_workers, cpus_per_worker), or more (logical)"
                 f" CPUs (ray.num_cpus)")]
    for p in plans:
        if p.resident:
            continue
        trial = [dict(n) for n in free]
        if not take(p, trial) or not (p.is_ray_data or _ray_data_room(trial)):
            problems.append(
                f"stage '{p.stage}' ({p.units} × {_fmt(p.demand())}) does not fit beside what"
                f" lives for the run ({held}) with {RAY_DATA_CPUS:g} CPU left for"
                f" Ray Data's tasks (which would wait forever) on {have.source}: lower its"
                f" CPUs, the engines' or the trainers', or give the cluster more (logical)"
                f" CPUs (ray.num_cpus)")
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
                 f" ({have.source}); engines and trainers hold theirs for the run, the other stages"
                 f" run one at a time beside them")
    for i, node in enumerate(have.nodes):
        shown = {k: v for k, v in node.items() if not k.startswith(_HIDDEN_PREFIXES)}
        lines.append(f"  node {i}: {_fmt(shown)}")
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**28 else f"{n / 2**20:.3g} MiB"


def lora_plan(cfg: RunConfig) -> list[str]:
    """With model.lora: trainable parameters, and the training state per worker (weights,
    gradients, Adam moments; activations aside) next to full fine-tuning, replicated and
    ZeRO-3-partitioned (`training_state_bytes`). Empty without LoRA or a local policy."""
    from pathlib import Path

    from workers.lora import inspect
    from workers.recipe.options import training_state_bytes

    lora, t = cfg.model.lora, cfg.train
    if lora is None or not (Path(cfg.model.policy) / "config.json").is_file():
        return []
    try:
        plan = inspect(cfg.model.policy, lora.model_dump(), cfg.model.trust_remote_code)
    except ValueError:
        return []  # check_paths reports it
    base = plan.total - plan.trainable
    rows = [("LoRA", training_state_bytes(plan.total, plan.trainable, t.bf16)),
            ("full fine-tuning", training_state_bytes(base, None, t.bf16))]
    lines = [(f"LoRA: {plan.trainable:,} trainable of {plan.total:,} parameters"
              f" ({100 * plan.trainable / plan.total:.2f}%), adapters on {plan.layers} layers"
              f" (rank {lora.r})"),
             (f"training state per worker ({'bf16' if t.bf16 else 'fp32'}; weights, gradients,"
              f" Adam; activations aside), replicated / ZeRO-3 over {t.num_workers} workers:")]
    lines += [f"  {name:<17} {_gib(b)} / {_gib(b / t.num_workers)}" for name, b in rows]
    return lines
