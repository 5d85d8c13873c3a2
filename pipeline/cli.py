"""`rayalign` command line: run | resume | toy | submit | status | logs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import ConfigError, RunConfig, check_paths, load_config, validate_loss
from pipeline.submit import ClusterUnreachable, add_job_commands


def _load(args: argparse.Namespace) -> RunConfig:
    overrides = {"run_dir": args.run_dir} if getattr(args, "run_dir", None) else {}
    if getattr(args, "ray_address", None):
        overrides["ray.address"] = args.ray_address
    return load_config(args.config, overrides)


def dry_run_report(cfg: RunConfig) -> tuple[str, list[str]]:
    """The effective config (defaults resolved) and placement plan as text, and the problems."""
    from pipeline.plan import check_plan, format_plan, stage_plans

    effective = cfg.model_dump(mode="json")
    effective["model"]["reference"] = cfg.model.reference_path
    effective["model"]["tokenizer"] = cfg.model.tokenizer_path
    effective["loss"]["params"] = validate_loss(cfg.loss)
    effective["train"]["grad_accum_steps"] = cfg.train.grad_accum_steps
    plans = stage_plans(cfg)
    have, problems = _resources(cfg)
    parts = ["effective config:", json.dumps(effective, indent=2), "", "placement plan:"]
    if have is not None:
        parts.append(format_plan(plans, have))
        problems += check_plan(plans, have)
    problems += check_paths(cfg)
    parts += ["", "problems:" if problems else "no problems found."]
    parts += [f"  - {p}" for p in problems]
    return "\n".join(parts), problems


def _resources(cfg: RunConfig):
    """This machine's resources, or the nodes of the cluster at ray.address (queried)."""
    from pipeline.plan import Resources, local_resources

    if cfg.ray.address is None:
        return local_resources(cfg), []
    from pipeline.cluster import cluster_nodes

    try:
        return Resources(cluster_nodes(cfg.ray.address), f"cluster at {cfg.ray.address}"), []
    except (ConnectionError, RuntimeError, ValueError) as err:  # reported, not raised
        return None, [f"ray.address: cannot query the cluster at {cfg.ray.address}: {err}"]


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.dry_run:
        report, problems = dry_run_report(cfg)
        print(report)
        return 1 if problems else 0
    from pipeline.dag import run_pipeline

    return run_pipeline(cfg, verbose=args.verbose)


def cmd_resume(args: argparse.Namespace) -> int:
    from pipeline.dag import resume_pipeline

    return resume_pipeline(Path(args.run_dir), verbose=args.verbose)


def cmd_toy(args: argparse.Namespace) -> int:
    from pipeline.toy import build_toy_world

    world = build_toy_world(args.out_dir, seed=args.seed)
    print(f"toy world ready in {args.out_dir}: model {world.model_dir}, train {world.train_path}")
    return 0


VERBOSE_HELP = ("show Ray's, vLLM's, DeepSpeed's and every worker's output live"
                " (default: in RUN_DIR/logs, one file per actor or worker)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayalign", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline described by a YAML config")
    run.add_argument("config", help="YAML run config")
    run.add_argument("--run-dir", help="override the config's run_dir")
    run.add_argument("--dry-run", action="store_true",
                     help="validate, print the effective config and placement plan, start nothing")
    run.add_argument("--ray-address", help="override ray.address (e.g. 'auto' inside a Ray job)")
    run.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="continue a run from its last finished stage")
    resume.add_argument("run_dir")
    resume.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    resume.set_defaults(func=cmd_resume)

    toy = sub.add_parser("toy", help="build the offline toy world (tokenizer, tiny model, data)")
    toy.add_argument("out_dir")
    toy.add_argument("--seed", type=int, default=0)
    toy.set_defaults(func=cmd_toy)
    add_job_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"rayalign: config error: {err}", file=sys.stderr)
        return 2
    except ClusterUnreachable as err:
        print(f"rayalign: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        if getattr(err, "rayalign_reported", False):  # a failed stage, already on the console
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
