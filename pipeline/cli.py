"""`rayalign` command line: run | sweep | resume | eval | export | toy | submit | status | logs.

Every command that reads a config takes overrides after it, torchtune/Hydra style:
`rayalign run CONFIG train.learning_rate=1e-4 rounds.count=3 loss.name=ipo`; they are
validated like the file (see pipeline.config.parse_overrides)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import ConfigError, RunConfig, load_config, parse_overrides, validate_loss
from pipeline.preflight import check_paths
from pipeline.standalone import UsageError
from pipeline.submit import ClusterUnreachable, add_job_commands


def _load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, parse_overrides(
        args.overrides, {"run_dir": args.run_dir, "ray.address": args.ray_address}))


def dry_run_report(cfg: RunConfig) -> tuple[str, list[str]]:
    """The effective config (defaults resolved) and placement plan as text, and the problems."""
    from pipeline.plan import available_resources, check_plan, format_plan, lora_plan, stage_plans

    effective = cfg.model_dump(mode="json")
    effective["model"]["reference"] = cfg.model.reference_path
    effective["model"]["tokenizer"] = cfg.model.tokenizer_path
    effective["loss"]["params"] = validate_loss(cfg.loss)
    effective["train"]["grad_accum_steps"] = cfg.train.grad_accum_steps
    plans = stage_plans(cfg)
    have, problems = available_resources(cfg)
    parts = ["effective config:", json.dumps(effective, indent=2), "", "placement plan:"]
    if have is not None:
        parts.append(format_plan(plans, have))
        problems += check_plan(plans, have)
    if lora := lora_plan(cfg):
        parts += ["", *lora]
    problems += check_paths(cfg)
    parts += ["", "problems:" if problems else "no problems found."]
    parts += [f"  - {p}" for p in problems]
    return "\n".join(parts), problems


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.dry_run:
        report, problems = dry_run_report(cfg)
        print(report)
        return 1 if problems else 0
    from pipeline.dag import run_pipeline

    return run_pipeline(cfg, verbose=args.verbose)


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.sweep import run_sweep

    return run_sweep(args.config, args.overrides, Path(args.sweep_dir) if args.sweep_dir else None,
                     args.max_concurrent, args.ray_address, args.dry_run, args.arms)


def cmd_resume(args: argparse.Namespace) -> int:
    from pipeline.dag import resume_pipeline

    return resume_pipeline(Path(args.run_dir), verbose=args.verbose)


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.standalone import round_checkpoint, round_reference, run_eval

    target = Path(args.target)
    overrides = parse_overrides(args.overrides)
    if (target / "config.yaml").is_file():  # a run directory: one of its rounds
        cfg = load_config(args.config or target / "config.yaml", overrides)
        k, model, train = round_checkpoint(target, args.round)
        trained = {key: train.outputs[key] for key in
                   ("num_pairs", "trained_pairs", "carried", "final_metrics") if key in train.outputs}
        out = Path(args.out) if args.out else target / "eval"
        run_eval(cfg, model, out, k, round_reference(target, cfg, k), trained)
        return 0
    if not args.config:
        raise UsageError(f"{target} is not a run directory (no config.yaml): evaluating a model"
                         " needs --config CONFIG (its eval data, reference and sampling)")
    if args.round is not None:
        raise UsageError("--round picks a round of a run directory; a model has none")
    cfg = load_config(args.config, overrides)
    run_eval(cfg, target, Path(args.out) if args.out else Path(cfg.run_dir) / "eval" / target.name)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.standalone import export_round

    k, files = export_round(Path(args.run_dir), args.round, Path(args.out))
    print(f"exported round {k} of {args.run_dir} to {args.out}: {', '.join(files)}")
    return 0


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
    add_overrides(run)
    run.add_argument("--run-dir", help="override the config's run_dir")
    run.add_argument("--dry-run", action="store_true",
                     help="validate, print the effective config and placement plan, start nothing")
    run.add_argument("--ray-address", help="override ray.address (e.g. 'auto' inside a Ray job)")
    run.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    run.set_defaults(func=cmd_run)

    sweep = sub.add_parser("sweep", help="a grid of runs side by side on one cluster, and"
                           " their comparison (key=a,b,c sweeps a key)")
    sweep.add_argument("config", help="YAML run config every run starts from")
    add_overrides(sweep)
    sweep.add_argument("--arms", metavar="FILE", help="named arms, each a set of overrides that"
                       " go together (YAML: `arms: {NAME: {key.path: value}}`); the grid is the"
                       " arms × the swept keys")
    sweep.add_argument("--sweep-dir", help="where the runs and the report go"
                       " (default: the config's run_dir + '-sweep')")
    sweep.add_argument("--max-concurrent", type=positive_int, help="at most this many runs at once"
                       " (default: as many as the cluster holds)")
    sweep.add_argument("--ray-address", help="join this cluster (default: ray.address, or a"
                       " local cluster)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="validate every run, print the grid and its placement, start nothing")
    sweep.set_defaults(func=cmd_sweep)

    resume = sub.add_parser("resume", help="continue a run from its last finished stage")
    resume.add_argument("run_dir")
    resume.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    resume.set_defaults(func=cmd_resume)

    ev = sub.add_parser("eval", help="evaluate a run's round, or a model, against the reference")
    ev.add_argument("target", metavar="RUN_DIR|MODEL",
                    help="a run directory (its config and a round's checkpoint) or a HF model dir")
    add_overrides(ev)
    ev.add_argument("--config", help="config giving the eval data, reference and sampling"
                    " (default for a run: RUN_DIR/config.yaml; needed for a model)")
    ev.add_argument("--round", type=int, help="round of the run (default: the last trained)")
    ev.add_argument("--out", help="results directory (default: RUN_DIR/eval, or"
                    " <run_dir>/eval/<model name>)")
    ev.set_defaults(func=cmd_eval)

    export = sub.add_parser("export", help="a round's policy as a clean Hugging Face directory")
    export.add_argument("run_dir")
    export.add_argument("out", help="new directory (safetensors, config, tokenizer)")
    export.add_argument("--round", type=int, help="round of the run (default: the last trained)")
    export.set_defaults(func=cmd_export)

    toy = sub.add_parser("toy", help="build the offline toy world (tokenizer, tiny model, data)")
    toy.add_argument("out_dir")
    toy.add_argument("--seed", type=int, default=0)
    toy.set_defaults(func=cmd_toy)
    add_job_commands(sub)
    add_overrides(sub.choices["submit"])
    return p


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE",
                   help="config overrides, e.g. train.learning_rate=1e-4 model.reference=null")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting overrides stand anywhere after the command (`run C --dry-run a.b=1`);
    argparse alone takes them only before the first option."""
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"rayalign: config error: {err}", file=sys.stderr)
        return 2
    except UsageError as err:
        print(f"rayalign: {err}", file=sys.stderr)
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
