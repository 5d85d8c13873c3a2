"""What is refused before any cluster work: missing paths, an unusable run_dir, pickle
weights, remote code, and what is never shown: secrets. Each names the key and the path."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.preflight import check_paths

SECRET = "hf_thisIsASecretTokenValue123"


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A directory with a (fake) safetensors model and a data file; cwd is inside it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    (tmp_path / "d.parquet").write_bytes(b"")
    return tmp_path


def config(**over):
    raw = {"model": {"policy": "m"}, "data": {"train": ["d.parquet"]}, "ray": {"num_cpus": 4}}
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw.setdefault(section, {})[leaf] = value
        else:
            raw[section] = value
    return parse_config(raw)


def run_cli(world, capsys, **over) -> tuple[int, str]:
    path = world / "run.yaml"
    path.write_text(yaml.safe_dump(config(**over).model_dump(mode="json")))
    code = main(["run", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("key, value, named", [
    ("model__policy", "missing-model", "model.policy: path does not exist: missing-model"),
    ("model__tokenizer", "no/tok/here", "model.tokenizer: path does not exist: no/tok/here"),
    ("data__train", ["nothing-*.parquet"], "data.train: no file matches 'nothing-*.parquet'"),
])
def test_missing_paths_stop_the_run_before_ray_starts(world, capsys, monkeypatch, key, value,
                                                     named):
    import pipeline.cluster

    def no_cluster(cfg):
        raise AssertionError("the run reached cluster work")

    monkeypatch.setattr(pipeline.cluster, "connect", no_cluster)
    code, err = run_cli(world, capsys, **{key: value})
    assert code == 2 and named in err


def test_run_dir_under_a_file_is_refused(world, capsys):
    (world / "afile").write_text("x")
    code, err = run_cli(world, capsys, run_dir="afile/run")
    assert code == 2 and "run_dir: afile/run cannot be created" in err


def test_unwritable_run_dir_is_refused(world):
    # /proc refuses new files even to root (a read-only mode bit would not stop root)
    problems = check_paths(config(run_dir="/proc/rayalign-run"))
    assert any(p.startswith("run_dir: /proc/rayalign-run is not writable (/proc:") for p in problems)


def test_too_little_free_disk_is_refused(world, capsys):
    code, err = run_cli(world, capsys, run_dir="runs/x", min_free_gib=1e9)
    assert code == 2 and "GiB free on the disk of" in err and "min_free_gib=1e+09" in err
    assert not (world / "runs").exists()  # checking created nothing


def test_pickle_only_weights_are_refused_unless_allowed(world):
    (world / "p").mkdir()
    (world / "p" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    problems = check_paths(config(model={"policy": "p"}))
    assert any(p.startswith("model.policy: p has only pickle weights (pytorch_model.bin)")
               for p in problems)
    assert not check_paths(config(model={"policy": "p", "allow_pickle_weights": True}))
    # safetensors beside a .bin: the safetensors file is what gets loaded
    (world / "p" / "model.safetensors").write_bytes(b"")
    assert not check_paths(config(model={"policy": "p"}))


def test_vllm_load_format_other_than_safetensors_needs_the_flag():
    with pytest.raises(ValueError, match="may load pickle weights"):
        config(reference={"engine": {"extra": {"load_format": "pt"}}})
    cfg = config(reference={"engine": {"extra": {"load_format": "pt"}}},
                 model={"policy": "m", "allow_pickle_weights": True})
    assert cfg.reference.engine.extra["load_format"] == "pt"


def test_remote_code_is_not_run_by_default(tmp_path):
    """A checkpoint that ships its own modelling code: loading it the way the trainer does
    refuses unless model.trust_remote_code is set, and the code never runs."""
    from workers.recipe.options import TrainLoopConfig
    from workers.recipe.recipe import _load_policy

    model = tmp_path / "evil"
    model.mkdir()
    marker = tmp_path / "code-ran"
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil_lm", "architectures": ["EvilLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilLM"}}))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = TrainLoopConfig(
        tokenizer_path=str(model), loss_name="sigmoid", loss_params={},
        zero_stage=0, micro_batch_size=1, grad_accum_steps=1, epochs=1,
        learning_rate=1e-4, lr_schedule="constant", grad_clip=1.0,
        weight_decay=0.0, adam_betas=(0.9, 0.95), seed=0, bf16=False,
        gradient_checkpointing=False)
    assert cfg.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        _load_policy(cfg, str(model), {})
    assert not marker.exists()


def test_dashboard_binds_to_localhost_by_default():
    from pipeline.cluster import init_kwargs

    kwargs = init_kwargs(config(), {})
    assert kwargs["dashboard_host"] == "127.0.0.1" and kwargs["include_dashboard"]
    assert init_kwargs(config(ray={"dashboard_host": "0.0.0.0"}), {})["dashboard_host"] == "0.0.0.0"


def test_secrets_in_the_environment_are_never_printed(world, capsys, monkeypatch):
    """--dry-run prints the effective config and plan, never a token from the environment.
    That workers never get them is read inside real workers:
    tests/integration/test_worker_env.py."""
    for name in ("HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, SECRET)
    cfg = config()
    path = world / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    main(["run", str(path), "--dry-run"])
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err


def test_share_prompt_needs_packing_and_not_flash():
    with pytest.raises(ValueError, match="share_prompt needs train.packing"):
        config(train={"share_prompt": True, "packing": False})
    with pytest.raises(ValueError, match="cannot use attention: flash"):
        config(train={"share_prompt": True, "packing": True, "attention": "flash"})
    assert config(train={"share_prompt": True, "packing": True}).train.attention == "auto"


def test_packing_and_a_shared_prompt_are_the_default_where_they_can_run():
    """Both are exact, so a user gets the fastest layout unless the kernel cannot share."""
    t = config().train
    assert (t.packing, t.share_prompt) == (True, True)
    assert config(train={"packing": False}).train.share_prompt is False
    assert config(train={"attention": "flash"}).train.share_prompt is False
    assert config(train={"share_prompt": False}).train.share_prompt is False


def test_run_dir_and_cache_become_absolute_even_before_they_exist(tmp_path, monkeypatch):
    """'runs/demo' looks like a hub id ('org/name') until it exists; a fresh clone's first
    run must still resolve it against the working directory (stages store absolute paths)."""
    from pipeline.preflight import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(config(run_dir="runs/demo",
                                     reference={"cache_dir": "cache/ref"},
                                     model={"policy": "Qwen/Qwen2-0.5B"}))
    assert cfg.run_dir == str(tmp_path / "runs" / "demo")
    assert cfg.reference.cache_dir == str(tmp_path / "cache" / "ref")
    assert cfg.model.policy == "Qwen/Qwen2-0.5B"  # a hub id stays one


def test_credential_names_are_recognised():
    """The names a local cluster's processes do not inherit (see test_worker_env.py)."""
    from pipeline.cluster import secret_names

    secrets = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "GITHUB_TOKEN", "OPENAI_API_KEY"]
    kept = ["TOKENIZERS_PARALLELISM", "RAY_AUTH_TOKEN", "PATH", "HF_HOME", "VLLM_CPU_KVCACHE_SPACE"]
    assert secret_names(dict.fromkeys(secrets + kept, "x")) == secrets
