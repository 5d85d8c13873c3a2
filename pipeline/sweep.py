"""`rayalign sweep CONFIG loss.name=sigmoid,ipo loss.params.beta=0.05,0.1 seed=0,1,2`: a grid
of runs, side by side on one Ray cluster, and a report that compares them.

An override with several comma-separated values (commas inside [...] or {...} do not
split) is an axis of the grid; one with a single value applies to every run. The grid is
every combination, in the order given. Each run is a normal run directory,
`<sweep dir>/<NN>_<key=value,...>`, started as `rayalign run CONFIG <overrides>` in its own
driver process that joins the sweep's cluster, so it is resumable like any run: running the
same sweep again skips every finished stage, and so does a grid that grows: a run is found
by its config, not its name (adopt_existing). Runs whose reference weights and data are the
same share one reference cache (`<sweep dir>/cache/reference`, unless the config names one).

Every run's config, paths and placement are checked before anything starts. Runs start
as soon as what they hold at their busiest (pipeline.plan.run_footprint: engines, trainer,
their largest other stage, a CPU for Ray Data) fits beside the runs already going, in grid
order, at most `--max-concurrent` at once. A failed run is reported with its log and the
others go on. The report (pipeline.sweep_report) is written when the last run ends.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import (
    ConfigError,
    RunConfig,
    load_config,
    parse_overrides,
    read_config_file,
    yaml_numbers,
)
from pipeline.console import console, log_dir_of, quiet_driver
from pipeline.manifest import stable_hash
from pipeline.preflight import check_paths, with_absolute_paths

POLL_S = 1.0


@dataclass(frozen=True)
class Axis:
    key: str
    values: list[Any]

    @property
    def is_seed(self) -> bool:
        """Seeds repeat an arm; they are not an arm of their own in the report."""
        return self.key == "seed" or self.key.endswith(".seed")


def split_values(text: str) -> list[str]:
    """'a,b,[1,2],{x: 1, y: 2}' → ['a', 'b', '[1,2]', '{x: 1, y: 2}']: commas at depth 0."""
    parts, depth, start, quote = [], 0, 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def parse_grid(items: list[str], arms: bool = False) -> tuple[dict[str, Any], list[Axis]]:
    """The overrides every run gets, and the axes (keys with two or more values); `arms`:
    named arms are given too (then no axis is needed)."""
    fixed: dict[str, Any] = {}
    axes: list[Axis] = []
    for item in items:
        key, _sep, text = item.partition("=")
        key = key.strip()
        parse_overrides([item])  # the key's shape, as `run` checks it
        parts = split_values(text)
        if any(not p.strip() for p in parts):
            raise ConfigError(f"sweep {key}: an empty value in {text!r}: give each value,"
                              " e.g. loss.name=sigmoid,ipo")
        if key in fixed or any(a.key == key for a in axes):
            raise ConfigError(f"sweep {key}: given twice; give all its values at once"
                              f" ({key}=a,b)")
        values = [parse_overrides([f"{key}={p.strip()}"])[key] for p in parts]
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(f"sweep {key}: a value is given twice in {text!r}")
        if len(values) == 1:
            fixed[key] = values[0]
        else:
            axes.append(Axis(key, values))
    if not axes and not arms:
        raise ConfigError("sweep: nothing to sweep; give at least one key two or more values,"
                          " e.g. loss.name=sigmoid,principled")
    return fixed, axes


def load_arms(path: str | Path) -> dict[str, dict[str, Any]]:
    """An arms file: `arms: {NAME: {key.path: value, ...}, ...}`, each arm a set of overrides
    that go together (a loss with its parameters, its learning rate, its data filter)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the arms file: {err}") from None
    arms = raw.get("arms") if isinstance(raw, dict) else None
    if not isinstance(arms, dict) or not arms:
        raise ConfigError(f"{path}: expected `arms: {{NAME: {{key.path: value, ...}}, ...}}`")
    for name, overrides in arms.items():
        if not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", str(name)):
            raise ConfigError(f"{path}: arm {name!r}: a name of letters, digits, . _ + -")
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: arm {name}: expected a mapping of key.path: value")
        parse_overrides(f"{k}=" for k in overrides)  # the keys' shape
    # the values as an override's would be read (1e-4 a number, as on the command line)
    return {str(k): {key: yaml_numbers(v) for key, v in a.items()} for k, a in arms.items()}


def format_value(value: Any) -> str:
    """A value as an override's text (YAML flow), which parse_overrides reads back."""
    return value if isinstance(value, str) and re.fullmatch(r"[\w.+-]+", value) and \
        parse_overrides([f"k={value}"])["k"] == value else json.dumps(value)


def point_label(point: dict[str, Any]) -> str:
    """'dpo,beta=0.1,seed=0': a named arm by its name, an axis as its last key part=value."""
    return ",".join(str(v) if k == "arm" else f"{k.rsplit('.', 1)[-1]}={format_value(v)}"
                    for k, v in point.items())


def run_name(index: int, point: dict[str, Any]) -> str:
    """'03_ipo,seed=1': the grid index and the point (a long one cut, with its hash kept)."""
    label = re.sub(r"[^\w.,=+-]", "-", point_label(point))
    if len(label) > 100:
        label = label[:90] + "-" + stable_hash(point)[:8]
    return f"{index:02d}_{label}"


@dataclass
class SweepRun:
    name: str
    point: dict[str, Any]  # this run's value of each axis
    overrides: dict[str, Any]  # all it gets: the fixed overrides, its point, run_dir, cache
    cfg: RunConfig
    arm: str  # the point without its seeds: what the report compares
    status: str = "pending"  # pending | running | done | failed | interrupted
    seconds: float | None = None
    returncode: int | None = None
    reservation: list[dict[str, float]] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return Path(self.cfg.run_dir)

    def argv(self, config: str, address: str | None) -> list[str]:
        """The `rayalign run` command of this run (what a user would type)."""
        args = [f"{k}={format_value(v)}" for k, v in self.overrides.items() if k != "run_dir"]
        return [sys.executable, "-m", "pipeline.cli", "run", config, *args,
                "--run-dir", str(self.dir), *(["--ray-address", address] if address else [])]


def raw_config(config: str) -> dict[str, Any]:
    """The config file as written (before validation; load_config reports its problems)."""
    try:
        raw = read_config_file(Path(config))
    except (OSError, ConfigError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _overlap(a: str, b: str) -> bool:
    """Do two dotted keys set the same value (equal, or one a section of the other)?"""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def expand(config: str, items: list[str], sweep_dir: Path, ray_address: str | None = None,
           arms: dict[str, dict[str, Any]] | None = None
           ) -> tuple[RunConfig, list[Axis], list[SweepRun]]:
    """The base config (the first run's, its run_dir the sweep's, where the sweep's own logs
    go), the axes, and every run of the grid (`arms` × the axes). Each run is validated from
    the very text its `rayalign run` gets, so what is checked here is what runs; every bad
    run is named at once."""
    fixed, axes = parse_grid(items, arms=bool(arms))
    chosen = [fixed.pop("arm")] if "arm" in fixed else next(
        (a.values for a in axes if a.key == "arm"), None)
    axes = [a for a in axes if a.key != "arm"]
    if chosen is not None and not arms:
        raise ConfigError("sweep arm=...: picks named arms of an --arms file; none is given")
    if arms:  # the named arms are the first axis; an arm's overrides go with its name
        chosen = [str(a) for a in chosen] if chosen else list(arms)
        unknown = [a for a in chosen if a not in arms]
        if unknown:
            raise ConfigError(f"sweep arm={','.join(chosen)}: no arm named"
                              f" {', '.join(unknown)} in the arms file (it has {', '.join(arms)})")
        given = [*fixed, *(a.key for a in axes)]
        clashes = sorted({f"{k} (arm {name})" for name in chosen for k in arms[name]
                          if any(_overlap(k, g) for g in given)})
        if clashes:
            raise ConfigError(f"sweep: set both by an arm and on the command line: "
                              f"{', '.join(clashes)}; set each key in one place")
        axes = [Axis("arm", chosen), *axes]
    shared_cluster = [a.key for a in axes if a.key.startswith("ray.")] + sorted(
        {k for a in (arms or {}).values() for k in a if k.startswith("ray.")})
    if shared_cluster:
        raise ConfigError(f"sweep: {', '.join(shared_cluster)} cannot differ between runs:"
                          " they share the sweep's one Ray cluster")
    if ray_address:
        fixed["ray.address"] = ray_address
    names_cache = bool((raw_config(config).get("reference") or {}).get("cache_dir")) or \
        "reference.cache_dir" in fixed or any(
        a.key == "reference.cache_dir" for a in axes) or any(
        "reference.cache_dir" in a for a in (arms or {}).values())
    runs, problems = [], []
    for i, combo in enumerate(itertools.product(*(a.values for a in axes))):
        point = dict(zip((a.key for a in axes), combo))
        name = run_name(i, point)
        own = {**arms[point["arm"]], **{k: v for k, v in point.items() if k != "arm"}} \
            if arms else point
        shared = {} if names_cache else {"reference.cache_dir": str(sweep_dir / "cache" / "reference")}
        text = [f"{k}={format_value(v)}" for k, v in {**fixed, **own, **shared}.items()]
        overrides = parse_overrides(text, {"run_dir": str(sweep_dir / name)})
        arm = point_label({a.key: v for a, v in zip(axes, combo) if not a.is_seed}) or "all"
        try:
            cfg = load_config(config, overrides)
        except ConfigError as err:
            problems.append((name, str(err)))
            continue
        runs.append(SweepRun(name, point, overrides, cfg, arm))
    if problems:
        raise ConfigError(f"{len(problems)} of the grid's {len(runs) + len(problems)} runs cannot"
                          " run:\n" + _grouped(problems))
    adopt_existing(runs, sweep_dir)
    base = runs[0].cfg.model_copy(update={"run_dir": str(sweep_dir)})
    return base, axes, runs


def run_identity(cfg: RunConfig) -> str:
    """What makes two runs the same run: the whole config as it runs (absolute paths) but
    for where it lives and the cluster it joins."""
    dump = with_absolute_paths(cfg).model_dump(mode="json")
    return stable_hash({k: v for k, v in dump.items() if k not in ("run_dir", "ray")})


def adopt_existing(runs: list[SweepRun], sweep_dir: Path) -> None:
    """Runs of this grid that an earlier sweep in the same directory started with the same
    config carry on in those runs' directories, whatever their names were: a grid that grows
    (seed=1 → seed=1,2,3, an arm put first) resumes what it has instead of renaming and
    recomputing it. A run whose name is a directory holding another config gets a name of
    its own, so the earlier run is left as it was."""
    found: dict[str, str | None] = {}  # directory name → identity of the run in it
    for config in sorted(sweep_dir.glob("*/config.yaml")) if sweep_dir.is_dir() else []:
        try:
            found[config.parent.name] = run_identity(load_config(config))
        except (ConfigError, OSError):
            found[config.parent.name] = None  # not a run this version reads: left alone
    free: dict[str, list[str]] = {}
    for name, identity in found.items():
        if identity:
            free.setdefault(identity, []).append(name)
    for run in runs:
        identity = run_identity(run.cfg)
        name = free[identity].pop(0) if free.get(identity) else (
            f"{run.name}-{identity[:8]}" if run.name in found else run.name)
        if name != run.name:
            run.name = name
            run.overrides["run_dir"] = str(sweep_dir / name)
            run.cfg = run.cfg.model_copy(update={"run_dir": str(sweep_dir / name)})
    if len({r.name for r in runs}) < len(runs):
        raise ConfigError(f"sweep: {sweep_dir} holds runs whose names this grid would give to"
                          " other configs; give the sweep another --sweep-dir")


def _grouped(problems: list[tuple[str, str]]) -> str:
    """'run A, run B: the problem' once for the runs that share it."""
    by_text: dict[str, list[str]] = {}
    for name, text in problems:
        by_text.setdefault(text, []).append(name)
    return "\n".join(f"run {', '.join(names)}: {text}" for text, names in by_text.items())


class Placement:
    """The cluster's free resources per node as runs take and give back their footprints."""

    def __init__(self, nodes: list[dict[str, float]]):
        self.free = [dict(n) for n in nodes]

    def reserve(self, cfg: RunConfig) -> list[dict[str, float]] | None:
        """Take the run's footprint; what it took per node, or None if it does not fit now."""
        from pipeline.plan import run_footprint, stage_plans, take

        trial = [dict(n) for n in self.free]
        if not all(take(p, trial) for p in run_footprint(stage_plans(cfg))):
            return None
        taken = [{k: n[k] - t.get(k, 0.0) for k in n} for n, t in zip(self.free, trial)]
        self.free = trial
        return taken

    def release(self, taken: list[dict[str, float]]) -> None:
        for node, t in zip(self.free, taken):
            for k, v in t.items():
                node[k] = node.get(k, 0.0) + v


def start_what_fits(pending: list[SweepRun], place: Placement, room: int) -> list[SweepRun]:
    """The pending runs, in grid order, that fit beside what is running now (at most `room`
    of them; a run too big for now does not hold up a smaller one behind it); their
    footprints are taken from `place` and they leave `pending`."""
    started: list[SweepRun] = []
    for run in list(pending):
        if len(started) >= room:
            break
        taken = place.reserve(run.cfg)
        if taken is not None:
            run.reservation = taken
            pending.remove(run)
            started.append(run)
    return started


def waves(runs: list[SweepRun], nodes: list[dict[str, float]], max_concurrent: int) -> list[list[str]]:
    """Which runs go together if they took equal time (the --dry-run's placement; the same
    start_what_fits as the sweep itself)."""
    pending, out = list(runs), []
    while pending:
        wave = start_what_fits(pending, Placement(nodes), max_concurrent)
        if not wave:  # preflight reports it
            break
        out.append([r.name for r in wave])
    return out


def preflight(runs: list[SweepRun], have) -> list[str]:
    """Every run's problems (paths, placement alone on the cluster), named by run."""
    from pipeline.plan import check_plan, stage_plans

    problems = []
    for run in runs:
        mine = check_paths(run.cfg) + check_plan(stage_plans(run.cfg), have)
        if not mine and Placement(have.nodes).reserve(run.cfg) is None:
            mine.append(f"what it holds at its busiest does not fit {have.source}")
        problems += [(run.name, p) for p in mine]
    return _grouped(problems).splitlines() if problems else []


def dry_run_text(config: str, axes: list[Axis], runs: list[SweepRun], have,
                 max_concurrent: int) -> str:
    from pipeline.plan import run_footprint, stage_plans

    lines = [f"sweep of {config}: {len(runs)} runs = "
             + " × ".join(f"{len(a.values)} {a.key}" for a in axes), ""]
    width = max(len(r.name) for r in runs)
    for r in runs:
        fp = run_footprint(stage_plans(r.cfg))
        lines.append(f"  {r.name.ljust(width)}  holds {sum(p.cpus for p in fp):g} CPU /"
                     f" {sum(p.gpus for p in fp):g} GPU  → {r.dir}"
                     + ("  (started before: resumes)" if (r.dir / "config.yaml").is_file() else ""))
    lines += ["", (f"placement on {have.source} ({have.cpus:g} CPU / {have.gpus:g} GPU in"
              f" {len(have.nodes)} node(s)), at most {max_concurrent} at once:")]
    lines += [f"  together: {', '.join(w)}" for w in waves(runs, have.nodes, max_concurrent)]
    lines.append("(a run starts as soon as the runs before it leave room; equal durations shown)")
    return "\n".join(lines)


def write_state(sweep_dir: Path, config: str, items: list[str], runs: list[SweepRun]) -> None:
    state = {"config": config, "grid": items, "runs": [
        {"name": r.name, "point": r.point, "arm": r.arm, "run_dir": str(r.dir), "status": r.status,
         "seconds": r.seconds, "returncode": r.returncode} for r in runs]}
    tmp = sweep_dir / "sweep.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, sweep_dir / "sweep.json")


def run_sweep(config: str, items: list[str], sweep_dir: Path | None = None,
              max_concurrent: int | None = None, ray_address: str | None = None,
              dry_run: bool = False, arms_file: str | None = None) -> int:
    from pipeline.plan import available_resources

    default_dir = f"{raw_config(config).get('run_dir') or RunConfig.model_fields['run_dir'].default}-sweep"
    sweep_dir = Path(sweep_dir or default_dir).resolve()
    arms = load_arms(arms_file) if arms_file else None
    base, axes, runs = expand(config, items, sweep_dir, ray_address, arms)
    have, problems = available_resources(base)
    limit = max_concurrent or len(runs)
    if have is not None:
        problems += preflight(runs, have)
    if dry_run:
        if have is not None:
            console.print(dry_run_text(config, axes, runs, have, limit), highlight=False,
                          soft_wrap=True)
        console.print("\n".join(["", "problems:", *[f"  - {p}" for p in problems]]
                                if problems else ["", "no problems found."]), highlight=False,
                      soft_wrap=True)
        return 1 if problems else 0
    if problems:
        raise ConfigError("\n".join(problems))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # the runs start from a copy, so that an edit of the config mid-sweep changes no run
    # (relative paths in it stay relative to the working directory, as for `run`)
    snapshot = sweep_dir / "config.yaml"
    snapshot.write_bytes(Path(config).read_bytes())
    log_dir = log_dir_of(sweep_dir)
    with quiet_driver(log_dir), _sigterm_interrupts():
        return _run_all(str(snapshot), items, base, runs, have, limit, sweep_dir)


def _run_all(config: str, items: list[str], base: RunConfig, runs: list[SweepRun], have,
             limit: int, sweep_dir: Path) -> int:
    from pipeline.cluster import connect
    from pipeline.sweep_report import write_report

    started = time.time()
    info = connect(base)
    console.print(f"sweep: {len(runs)} runs in {sweep_dir}; Ray dashboard:"
                  f" {info['dashboard_url'] or '(not running)'}")
    place = Placement(have.nodes)
    pending: list[SweepRun] = list(runs)
    running: dict[str, tuple[SweepRun, subprocess.Popen, float]] = {}
    try:
        while pending or running:
            wave = start_what_fits(pending, place, limit - len(running))
            for i, run in enumerate(wave, 1):
                run.status = "running"
                running[run.name] = (run, _launch(run, config, info["address"]), time.time())
                console.print(f"  ▶ {run.name} started ({len(running)} running,"
                              f" {len(pending) + len(wave) - i} waiting); console:"
                              f" {run.dir / 'console.log'}", soft_wrap=True)
            write_state(sweep_dir, config, items, runs)
            time.sleep(POLL_S)
            for name, (run, proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                place.release(run.reservation)
                run.returncode, run.seconds = proc.returncode, time.time() - t0
                run.status = "done" if proc.returncode == 0 else "failed"
                console.print(f"  {'✓' if run.status == 'done' else '[red]✗[/]'} {name}"
                              f" {run.status} in {run.seconds:.0f} s"
                              + ("" if run.status == "done" else
                                 f" (exit {proc.returncode}): see {run.dir / 'console.log'}"),
                              soft_wrap=True)
    except KeyboardInterrupt:  # Ctrl-C (the runs got it too) or SIGTERM: let them stop cleanly
        _stop(running)
        write_state(sweep_dir, config, items, runs)
        console.print(f"sweep interrupted; {len(running)} run(s) stopped. Run the same sweep"
                      " again to resume: finished stages are skipped.")
        return 130
    write_state(sweep_dir, config, items, runs)  # the last runs' final status
    report = write_report(sweep_dir, runs)
    failed = [r.name for r in runs if r.status != "done"]
    console.print(f"sweep took {time.time() - started:.0f} s;"
                  f" {len(runs) - len(failed)} of {len(runs)} runs finished"
                  + (f", failed: {', '.join(failed)}" if failed else ""))
    console.print(f"report:     {report}")
    return 1 if failed else 0


STOP_WAIT_S = 120.0  # how long an interrupted run gets to stop its workers before it is killed


def _stop(running: dict[str, tuple[SweepRun, subprocess.Popen, float]]) -> None:
    """SIGINT to each running run (its driver ends its trainer and engines), then wait; a
    run still alive after STOP_WAIT_S is killed."""
    for run, proc, _ in running.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        run.status = "interrupted"
    deadline = time.time() + STOP_WAIT_S
    for _, proc, _ in running.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a job scheduler, `kill`) stops the sweep like Ctrl-C does."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _launch(run: SweepRun, config: str, address: str) -> subprocess.Popen:
    """`rayalign run` for this run in its own driver process, joined to the sweep's cluster;
    its console output goes to <run_dir>/console.log."""
    run.dir.mkdir(parents=True, exist_ok=True)
    with (run.dir / "console.log").open("a") as log:  # the child holds its own copy
        return interruptible(run.argv(config, address), stdout=log, stderr=subprocess.STDOUT)


def interruptible(argv: list[str], **popen: Any) -> subprocess.Popen:
    """A child process that SIGINT interrupts (what `_stop` sends), whatever this process
    does with SIGINT: a sweep started in the background (`nohup rayalign sweep ... &`)
    ignores it, and an ignored signal stays ignored in its children, so its runs could only
    be killed."""
    # preexec_fn runs between fork and exec; this one only resets a signal's disposition (a
    # system call, no lock another thread could hold), which is what makes it safe here
    return subprocess.Popen(argv, preexec_fn=_default_sigint, **popen)  # noqa: PLW1509


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python then installs its own handler
