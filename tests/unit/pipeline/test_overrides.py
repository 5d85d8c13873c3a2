"""Command-line overrides (`rayalign run CONFIG train.learning_rate=1e-4 ...`): parsed as
YAML values, validated exactly like the file, kept in the saved config so that resume
gets the same stage keys; and the eval/export commands' run-directory checks."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser, main, parse_args
from pipeline.config import ConfigError, load_config, parse_overrides
from pipeline.dag import OFFLINE_ROUND, Round, stage_key
from pipeline.manifest import Manifest, stable_hash
from pipeline.preflight import with_absolute_paths
from pipeline.standalone import UsageError, export_model, round_checkpoint
from pipeline.submit import entrypoint

ROOT = Path(__file__).resolve().parents[3]
BASE = {"model": {"policy": "m"}, "data": {"train": ["d.parquet"], "eval": ["e.parquet"]},
        "reward": None, "ray": {"num_cpus": 4}}


@pytest.fixture
def config(tmp_path, monkeypatch):
    """A config file whose paths exist (relative to tmp_path, the working directory)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    for name in ("d.parquet", "e.parquet"):
        (tmp_path / name).write_bytes(b"")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


@pytest.mark.parametrize("item, key, value", [
    ("train.learning_rate=1e-4", "train.learning_rate", 1e-4),
    ("train.learning_rate=5E-6", "train.learning_rate", 5e-6),
    ("rounds.count=3", "rounds.count", 3),
    ("loss.name=ipo", "loss.name", "ipo"),
    ("train.adam_betas=[0.9,0.99]", "train.adam_betas", [0.9, 0.99]),
    ("data.eval=[a.parquet, b.parquet]", "data.eval", ["a.parquet", "b.parquet"]),
    ("model.reference=null", "model.reference", None),
    ("train.packing=true", "train.packing", True),
    ("loss.params={beta: 0.2, gamma: 1e-2}", "loss.params", {"beta": 0.2, "gamma": 0.01}),
    ("data.system_prompt=Be brief, one line.", "data.system_prompt", "Be brief, one line."),
    ("data.system_prompt='Be brief: one line.'", "data.system_prompt", "Be brief: one line."),
    ("data.system_prompt=", "data.system_prompt", ""),
    ("run_dir=runs/a=b", "run_dir", "runs/a=b"),
])
def test_values_are_yaml(item, key, value):
    assert parse_overrides([item]) == {key: value}


@pytest.mark.parametrize("item", ["train.learning_rate", "=3", "train..seed=1", ".seed=1"])
def test_malformed_overrides_are_refused(item):
    with pytest.raises(ConfigError, match=f"override {item!r}: expected key.path=value"):
        parse_overrides([item])


def test_later_overrides_and_flags_win():
    got = parse_overrides(["train.seed=1", "train.seed=2", "run_dir=x"],
                          {"run_dir": "from-flag", "ray.address": None})
    assert got == {"train.seed": 2, "run_dir": "from-flag"}


def test_overrides_apply_and_validate_like_the_file(config):
    cfg = load_config(config, parse_overrides(
        ["train.learning_rate=1e-4", "loss.name=ipo", "train.adam_betas=[0.9,0.99]",
         "model.reference=null", "reward.function=pipeline.toy.reward:toy_gold_rewards",
         "rounds.mode=online", "rounds.count=3", "loss.params.beta=0.2"]))
    assert cfg.train.learning_rate == 1e-4 and cfg.loss.name == "ipo"
    assert cfg.train.adam_betas == (0.9, 0.99) and cfg.model.reference is None
    assert cfg.rounds.count == 3 and cfg.rounds.mode == "online"
    assert cfg.reward.function == "pipeline.toy.reward:toy_gold_rewards"  # null section created
    assert cfg.loss.params == {"beta": 0.2}


@pytest.mark.parametrize("items, message", [
    (["train.learnin_rate=1e-4"], "train.learnin_rate: unknown key (set by a command-line override)"),
    (["trian.learning_rate=1e-4"], "trian: unknown key"),
    (["train.learning_rate=-1"], "train.learning_rate: Input should be greater than 0"),
    (["train.adam_betas=[0.9]"], "train.adam_betas"),
    (["rounds.count=3"], "rounds.mode 'offline' with rounds.count > 1"),
    (["loss.name=nope"], "loss.name: unknown loss 'nope'"),
    (["ray.num_cpus.x=1"], "override ray.num_cpus.x: ray.num_cpus is 4, not a section"),
    (["train.seed.x=1"], "train.seed: Input should be a valid integer (set by a command-line"),
    (["model=gpt2"], "model: Input should be a valid dictionary"),
    (["data.system_prompt=Be brief: one line."], "data.system_prompt: Input should be a valid string"),
])
def test_bad_overrides_name_the_key(config, items, message):
    with pytest.raises(ConfigError) as err:
        load_config(config, parse_overrides(items))
    assert message in str(err.value) and str(err.value).startswith(str(config))


def test_saved_config_keeps_the_overrides_and_the_stage_keys(config, tmp_path):
    """run_pipeline saves the validated config (with absolute paths) as run_dir/config.yaml;
    resume loads that file: same config, same train and evaluate stage keys."""
    items = ["train.learning_rate=1e-4", "loss.name=ipo", "loss.params.beta=0.3",
             "train.adam_betas=[0.9,0.99]", "eval.num_prompts=7"]
    cfg = with_absolute_paths(load_config(config, parse_overrides(items)))
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))  # as run_pipeline
    raw = yaml.safe_load(saved.read_text())
    assert raw["train"]["learning_rate"] == 1e-4 and raw["loss"] == {"name": "ipo",
                                                                     "params": {"beta": 0.3}}
    assert raw["train"]["adam_betas"] == [0.9, 0.99] and raw["eval"]["num_prompts"] == 7
    resumed = load_config(saved)
    assert stable_hash(resumed.model_dump()) == stable_hash(cfg.model_dump())
    assert keys(resumed, tmp_path) == keys(cfg, tmp_path)
    assert keys(load_config(config), tmp_path) != keys(cfg, tmp_path)  # the overrides count


def keys(cfg, run_dir) -> dict[str, str]:
    done = {"reference": Manifest("reference", "ref-key", {}, {}, 0.0, 0.0),
            "train": Manifest("train", "t", {}, {"model_digest": "trained"}, 0.0, 0.0)}
    r = Round(cfg, run_dir, 0, "m", "m", {}, policy_digest="policy", done=done)
    return {s.name: stage_key(s.name, s.key_inputs(r)) for s in OFFLINE_ROUND
            if s.name in ("train", "evaluate")}


def test_cli_dry_run_prints_the_overridden_config(config, tmp_path):
    """The real command line, in a subprocess: overrides before and after options."""
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(config), "train.learning_rate=1e-4",
           "--dry-run", "loss.name=ipo", "train.adam_betas=[0.9,0.99]", "model.reference=null",
           "--run-dir", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout.split("effective config:\n", 1)[1].split("\n\nplacement plan:", 1)[0]
    effective = json.loads(text)
    assert effective["train"]["learning_rate"] == 1e-4 and effective["loss"]["name"] == "ipo"
    assert effective["train"]["adam_betas"] == [0.9, 0.99]
    assert effective["model"]["reference"] == "m"  # null: the policy, resolved
    assert effective["run_dir"] == str(tmp_path / "run")
    assert "beta" in effective["loss"]["params"]  # ipo's defaults resolved
    bad = subprocess.run(cmd[:5] + ["train.learnin_rate=1e-4", "--dry-run"], check=False,
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "train.learnin_rate: unknown key" in bad.stderr


def test_overrides_stand_anywhere_but_flags_stay_checked(capsys):
    p = build_parser()
    args = parse_args(p, ["run", "c.yaml", "a.b=1", "--dry-run", "c.d=2", "--run-dir", "r"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.dry_run and args.run_dir == "r"
    for argv in (["run", "c.yaml", "--dry-rn"], ["resume", "r", "a.b=1"]):
        with pytest.raises(SystemExit):
            parse_args(p, argv)
    assert "unrecognized arguments" in capsys.readouterr().err
    assert main(["run", "c.yaml", "x", "--dry-run"]) == 2
    assert "override 'x': expected key.path=value" in capsys.readouterr().err


def test_submit_passes_the_overrides_to_the_job(config):
    argv = shlex.split(entrypoint("c.yaml", "/runs/x", ["train.learning_rate=1e-4",
                                                          "data.system_prompt=Be brief."]))
    args = parse_args(build_parser(), argv[3:])
    assert args.overrides == ["train.learning_rate=1e-4", "data.system_prompt=Be brief."]
    assert args.ray_address == "auto" and args.run_dir == "/runs/x"
    assert main(["submit", str(config), "train.learnin_rate=1", "--no-check"]) == 2


def fake_run(root: Path, rounds: dict[int, str]) -> Path:
    """A run directory whose round k's train stage finished with model_dir rounds[k]."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(BASE))
    for k, model_dir in rounds.items():
        stage = root / f"round-{k}" / "train"
        stage.mkdir(parents=True)
        (stage / "manifest.json").write_text(json.dumps(
            Manifest("train", "key", {}, {"model_dir": model_dir}, 0.0, 0.0).__dict__))
    (root / "round-9" / "train.tmp").mkdir(parents=True)  # an unfinished round is no round
    return root


def test_round_checkpoint_picks_a_finished_round(tmp_path):
    run = fake_run(tmp_path / "run", {0: "model", 1: "/initial/policy"})
    assert round_checkpoint(run, None)[:2] == (1, Path("/initial/policy"))  # 0 steps: the policy
    assert round_checkpoint(run, 0)[:2] == (0, run / "round-0" / "train" / "model")
    with pytest.raises(UsageError, match=r"round 9 has no finished train stage \(trained rounds: 0, 1\)"):
        round_checkpoint(run, 9)
    with pytest.raises(UsageError, match="not a run directory"):
        round_checkpoint(tmp_path, 0)
    assert main(["export", str(run), "--round", "5", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_export_refuses_what_it_cannot_write_cleanly(tmp_path):
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="holds no safetensors weights"):
        export_model(tmp_path / "pickled", tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UsageError, match="exists and is not an empty directory"):
        export_model(tmp_path / "pickled", tmp_path / "full")
