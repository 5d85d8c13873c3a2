"""`rayalign submit | status | logs`: a run as a Ray job on a cluster (JobSubmissionClient).

The job's entrypoint is `python -m pipeline.cli run CONFIG --ray-address auto`, started on
the cluster in a copy of the working directory (runtime_env `working_dir`), optionally with
a `pip` spec. Environment variables named with `--env` travel in the runtime_env; their
values (tokens, keys) are never printed: status output shows the names only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, load_config, parse_overrides

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the working dir: environments, caches, run outputs, VCS data.
WORKING_DIR_EXCLUDES = [".venv/", ".git/", ".cache/", ".toy/", "runs/", "**/__pycache__/",
                        "*.egg-info/", ".lock-venv/", ".mypy_cache/", ".ruff_cache/"]


def default_address() -> str:
    return os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as err:
        raise ClusterUnreachable(f"cannot reach the Ray job server at {address}: {err}") from None


class ClusterUnreachable(RuntimeError):
    """The job server did not answer; the CLI prints this and exits 1."""


def dashboard_url(address: str, job_id: str) -> str:
    base = address.rstrip("/")
    return f"{base}/#/jobs/{job_id}" if base.startswith(("http://", "https://")) else base


def parse_env(items: list[str]) -> dict[str, str]:
    """`--env NAME` takes NAME's value from this environment; `--env NAME=VALUE` sets it."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise ConfigError(f"--env {name}: not set in this environment")
            value = os.environ[name]
        if not name.isidentifier():
            raise ConfigError(f"--env {item.split('=')[0]!r}: not a valid variable name")
        env[name] = value
    return env


def entrypoint(config_rel: str, run_dir: str | None, overrides: Sequence[str] = ()) -> str:
    """The job's command: `run` on the uploaded config, with the same overrides."""
    argv = ["python", "-m", "pipeline.cli", "run", config_rel, *overrides, "--ray-address", "auto"]
    return shlex.join(argv + (["--run-dir", run_dir] if run_dir else []))


def runtime_env(working_dir: Path, env: dict[str, str], pip: list[str]) -> dict[str, Any]:
    renv: dict[str, Any] = {"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES}
    if env:
        renv["env_vars"] = dict(env)
    if len(pip) == 1 and Path(pip[0]).is_file():
        renv["pip"] = str(Path(pip[0]).resolve())  # a requirements file, read here by Ray
    elif pip:
        renv["pip"] = list(pip)
    return renv


def redact(renv: dict[str, Any] | None) -> dict[str, Any]:
    """A runtime_env safe to print: env var values replaced, everything else kept."""
    out = dict(renv or {})
    if out.get("env_vars"):
        out["env_vars"] = {k: "<hidden>" for k in out["env_vars"]}
    return out


def _config_in_working_dir(config: Path, working_dir: Path) -> str:
    try:
        return str(config.resolve().relative_to(working_dir.resolve()))
    except ValueError:
        raise ConfigError(f"{config} is not inside the working dir {working_dir}: the job reads"
                          " it from the uploaded copy (pass --working-dir)") from None


def _check_cluster(cfg: RunConfig, address: str) -> list[str]:
    from pipeline.cluster import cluster_nodes
    from pipeline.plan import Resources, check_plan, stage_plans

    try:
        have = Resources(cluster_nodes(address), f"cluster at {address}")
    except ConnectionError as err:
        raise ClusterUnreachable(f"cannot read the nodes of the cluster at {address}: {err}"
                                 ) from None
    return check_plan(stage_plans(cfg), have)


def _json_resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--entrypoint-resources: not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError("--entrypoint-resources: expected a JSON object {name: amount}")
    return value


def cmd_submit(args: argparse.Namespace) -> int:
    overrides = getattr(args, "overrides", [])
    # refuse an invalid config before any cluster work
    cfg = load_config(args.config, parse_overrides(overrides, {"run_dir": args.run_dir}))
    working_dir = Path(args.working_dir)
    config_rel = _config_in_working_dir(Path(args.config), working_dir)
    if not args.no_check:
        problems = _check_cluster(cfg, args.address)
        if problems:
            print("rayalign: the cluster cannot run this config:", file=sys.stderr)
            print("\n".join(f"  - {p}" for p in problems), file=sys.stderr)
            return 1
    renv = runtime_env(working_dir, parse_env(args.env), args.pip)
    resources = _json_resources(args.entrypoint_resources)
    client = _client(args.address)
    job_id = client.submit_job(
        entrypoint=entrypoint(config_rel, args.run_dir, overrides), runtime_env=renv,
        submission_id=args.submission_id, metadata={"rayalign_config": config_rel},
        entrypoint_num_cpus=args.entrypoint_num_cpus or None,
        entrypoint_num_gpus=args.entrypoint_num_gpus or None,
        entrypoint_resources=resources or None)
    print(f"submitted job {job_id}")
    print(f"dashboard: {dashboard_url(args.address, job_id)}")
    if renv.get("env_vars"):
        print(f"env vars passed (values hidden): {', '.join(sorted(renv['env_vars']))}")
    if not args.wait:
        print(f"follow it: rayalign logs {job_id} --follow --address {args.address}")
        return 0
    return follow(client, job_id)


def follow(client, job_id: str, poll_s: float = 2.0) -> int:
    """Print the job's logs as they grow until it ends; return its exit code.

    Polls get_job_logs + get_job_info: plain HTTP, and it stops as soon as the job's status
    is terminal."""
    printed = 0
    while True:
        info = client.get_job_info(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        if info.status.is_terminal():
            break
        time.sleep(poll_s)
    print(f"job {job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    return exit_code(info)


def exit_code(info) -> int:
    if info.driver_exit_code is not None:
        return int(info.driver_exit_code)
    return 0 if info.status.value == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    info = _client(args.address).get_job_info(args.job)
    fields = {"job": args.job, "status": info.status.value, "message": info.message,
              "entrypoint": info.entrypoint, "ray_job_id": info.job_id,
              "driver_node": getattr(info, "driver_node_id", None),
              "exit_code": info.driver_exit_code, "start_time": info.start_time,
              "end_time": info.end_time, "metadata": info.metadata,
              "runtime_env": redact(info.runtime_env),
              "dashboard": dashboard_url(args.address, args.job)}
    for k, v in fields.items():
        if v not in (None, "", {}):
            print(f"{k + ':':<12} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args.address)
    if args.follow:
        return follow(client, args.job)
    print(client.get_job_logs(args.job), end="")
    return 0


def add_job_commands(sub: argparse._SubParsersAction) -> None:
    """Add submit, status and logs to the `rayalign` parser."""

    def address(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", default=default_address(),
                       help="Ray dashboard / job server (default: $RAY_ADDRESS or "
                            f"{DEFAULT_ADDRESS})")

    submit = sub.add_parser("submit", help="submit a run to a Ray cluster as a job")
    submit.add_argument("config", help="YAML run config, inside --working-dir")
    address(submit)
    submit.add_argument("--working-dir", default=".", help="uploaded as the job's working dir")
    submit.add_argument("--run-dir", help="override the config's run_dir")
    submit.add_argument("--pip", action="append", default=[],
                        help="pip requirement (repeatable) or one requirements file")
    submit.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                        help="env var for the job (repeatable); values are never printed")
    submit.add_argument("--entrypoint-num-cpus", type=float, default=0)
    submit.add_argument("--entrypoint-num-gpus", type=float, default=0)
    submit.add_argument("--entrypoint-resources", default="{}",
                        help='custom resources for the driver, JSON, e.g. \'{"head": 0.01}\'')
    submit.add_argument("--submission-id", help="job id to use (default: Ray makes one)")
    submit.add_argument("--no-check", action="store_true",
                        help="skip checking the placement plan against the cluster's nodes")
    submit.add_argument("--wait", action="store_true",
                        help="follow the logs to the end; exit with the job's exit code")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="status of a submitted job")
    status.add_argument("job")
    address(status)
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="logs of a submitted job")
    logs.add_argument("job")
    address(logs)
    logs.add_argument("--follow", action="store_true",
                      help="stream until the job ends; exit with its exit code")
    logs.set_defaults(func=cmd_logs)
