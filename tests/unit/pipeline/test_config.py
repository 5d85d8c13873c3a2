"""Config validation: the good configs load, each kind of bad config names its key path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.cli import dry_run_report, main
from pipeline.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[3]
MINIMAL = {"model": {"policy": "m"}, "data": {"train": ["d.parquet"]}}


def with_(path: str, value, base=MINIMAL):
    raw = copy.deepcopy(base)
    node = raw
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return raw


@pytest.mark.parametrize("name", ["demo.yaml", "qwen2.5-7b-8xgpu.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.model.reference_path == cfg.model.policy
    assert cfg.train.grad_accum_steps >= 1


def test_the_8_gpu_config_fits_one_8_gpu_node():
    """Engines hold their GPUs for the run: the documented node (8 GPUs, 96 CPUs) holds
    both engine pools and the trainers at once."""
    from pipeline.plan import Resources, check_plan, stage_plans

    cfg = load_config(ROOT / "configs" / "qwen2.5-7b-8xgpu.yaml")
    node = Resources([{"CPU": 96.0, "GPU": 8.0}], "an 8-GPU node")
    assert check_plan(stage_plans(cfg), node) == []
    assert check_plan(stage_plans(cfg), Resources([{"CPU": 96.0, "GPU": 7.0}], "7 GPUs"))


def test_defaults_resolve():
    cfg = parse_config(MINIMAL)
    assert cfg.model.trust_remote_code is False
    assert cfg.model.reference_path == "m" and cfg.model.tokenizer_path == "m"
    assert cfg.loss.name == "principled" and cfg.train.zero_stage == "auto"
    assert cfg.ray.dashboard_host == "127.0.0.1"
    assert cfg.train.grad_accum_steps == 16 // (4 * 2)


@pytest.mark.parametrize("raw, fragment", [
    (with_("model.polcy", "x"), "model.polcy: unknown key"),
    (with_("trian", {}), "trian: unknown key"),
    ({"data": {"train": ["d"]}}, "model: Field required"),
    (with_("data.train", []), "data.train"),
    (with_("train.micro_batch_size", 0), "train.micro_batch_size"),
    (with_("train.zero_stage", 4), "train.zero_stage"),
    (with_("data.truncation", "middle"), "data.truncation"),
    (with_("data.max_quarantine_fraction", 1.5), "data.max_quarantine_fraction"),
    (with_("train.global_batch_size", 10), "multiple of micro_batch_size"),
    (with_("rounds.mode", "online"), "needs a 'reward' section"),
    (with_("reward", {"kind": "function"}), "needs reward.function"),
    (with_("reward", {"kind": "function", "function": "no_colon"}), "module:function"),
    (with_("loss", {"name": "dpoo"}), "unknown loss 'dpoo'; valid:"),
    (with_("loss", {"name": "sigmoid", "params": {"betta": 0.1}}), "unknown parameter(s) ['betta']"),
    (with_("train", {"optimizer": "cpu_adam", "zero_stage": 0}), "it needs zero_stage 1, 2 or 3"),
    (with_("train", {"offload_params": True, "zero_stage": 2}),
     "train.offload_params needs zero_stage: 3"),
    # removed keys (never read): an old config that sets them is told so
    (with_("model.dtype", "float32"), "model.dtype: unknown key"),
    (with_("reward", {"kind": "judge", "model": "j", "batch_size": 8}),
     "reward.batch_size does not apply to kind 'judge'"),
    (with_("data.shuffle_seed", 0), "data.shuffle_seed: unknown key"),
])
def test_bad_configs_name_the_key(raw, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "cfg.yaml")
    assert fragment in str(err.value)
    assert str(err.value).startswith("cfg.yaml")


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(MINIMAL))
    assert load_config(p, {"run_dir": "elsewhere"}).run_dir == "elsewhere"


def test_dry_run_plan_and_problems(tmp_path):
    raw = with_("train.num_workers", 8)
    raw["train"].update(cpus_per_worker=4, global_batch_size=32)
    raw["ray"] = {"num_cpus": 2}
    text, problems = dry_run_report(parse_config(raw))
    assert "placement plan:" in text and "Ray Train workers" in text
    assert '"grad_accum_steps"' in text and '"beta": 0.1' in text
    assert any("stage 'train' needs 32 CPU" in p for p in problems)
    assert any("model.policy: path does not exist: m" in p for p in problems)
    assert any("data.train: no file matches 'd.parquet'" in p for p in problems)


def test_cli_dry_run_exit_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "d.parquet").write_bytes(b"")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(with_("ray", {"num_cpus": 4})))
    assert main(["run", str(good), "--dry-run"]) == 0
    assert "no problems found." in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_("train.lr", 1)))
    assert main(["run", str(bad), "--dry-run"]) == 2
    assert "train.lr: unknown key" in capsys.readouterr().err


def test_saved_config_reloads_to_the_same_hash(tmp_path):
    """resume re-reads run_dir/config.yaml: stage keys must not change (0 vs 0.0 did once)."""
    from pipeline.manifest import stable_hash

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert stable_hash(load_config(saved).model_dump()) == stable_hash(cfg.model_dump())
