"""`rayalign submit | status | logs` pieces that need no cluster: the entrypoint, the
runtime_env, redaction of env values, and the errors a user sees before any job exists."""

from __future__ import annotations

import shlex
import socket

import pytest
import yaml

from pipeline.cli import build_parser, main
from pipeline.config import ConfigError
from pipeline.submit import (
    WORKING_DIR_EXCLUDES,
    dashboard_url,
    entrypoint,
    parse_env,
    redact,
    runtime_env,
)


def test_entrypoint_runs_the_config_against_the_jobs_cluster():
    argv = shlex.split(entrypoint("configs/my run.yaml", "/runs/x"))
    assert argv == ["python", "-m", "pipeline.cli", "run", "configs/my run.yaml",
                    "--ray-address", "auto", "--run-dir", "/runs/x"]
    args = build_parser().parse_args(argv[3:])
    assert args.ray_address == "auto" and args.run_dir == "/runs/x"


def test_runtime_env_carries_working_dir_env_and_pip(tmp_path):
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("rich\n")
    renv = runtime_env(tmp_path, {"HF_TOKEN": "secret"}, [str(reqs)])
    assert renv["working_dir"] == str(tmp_path) and renv["pip"] == str(reqs.resolve())
    assert renv["env_vars"] == {"HF_TOKEN": "secret"}
    assert renv["excludes"] == WORKING_DIR_EXCLUDES and ".venv/" in renv["excludes"]
    assert runtime_env(tmp_path, {}, ["rich", "tqdm"])["pip"] == ["rich", "tqdm"]
    assert "env_vars" not in runtime_env(tmp_path, {}, [])


def test_redact_hides_values_only():
    renv = {"working_dir": "gcs://x.zip", "env_vars": {"HF_TOKEN": "hf_secret", "A": "1"}}
    shown = redact(renv)
    assert shown == {"working_dir": "gcs://x.zip", "env_vars": {"HF_TOKEN": "<hidden>", "A": "<hidden>"}}
    assert renv["env_vars"]["HF_TOKEN"] == "hf_secret"  # the original is untouched
    assert redact(None) == {}


def test_parse_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "from-env")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    assert parse_env(["HF_TOKEN", "X=1=2"]) == {"HF_TOKEN": "from-env", "X": "1=2"}
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE: not set"):
        parse_env(["NOT_SET_ANYWHERE"])
    with pytest.raises(ConfigError, match="not a valid variable name"):
        parse_env(["1BAD=x"])


def test_dashboard_url():
    assert dashboard_url("http://head:8265/", "raysubmit_1") == "http://head:8265/#/jobs/raysubmit_1"


def test_default_address_from_env(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")
    assert build_parser().parse_args(["status", "j"]).address == "http://elsewhere:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    assert build_parser().parse_args(["logs", "j"]).address == "http://127.0.0.1:8265"


def _config(tmp_path):
    (tmp_path / "m").mkdir()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"policy": "m"}, "data": {"train": ["d.parquet"]}}))
    return path


def test_submit_refuses_a_config_outside_the_working_dir(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    assert main(["submit", str(_config(tmp_path)), "--working-dir", str(work)]) == 2
    assert "is not inside the working dir" in capsys.readouterr().err


def test_unreachable_job_server_is_a_clear_error(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"http://127.0.0.1:{port}"
    assert main(["status", "raysubmit_x", "--address", address]) == 1
    assert f"cannot reach the Ray job server at {address}" in capsys.readouterr().err
    config = _config(tmp_path)
    rc = main(["submit", str(config), "--working-dir", str(tmp_path), "--no-check",
               "--address", address])
    assert rc == 1 and "cannot reach the Ray job server" in capsys.readouterr().err
    # without --no-check, the placement check is the first thing to find the cluster gone
    assert main(["submit", str(config), "--working-dir", str(tmp_path), "--address", address]) == 1
    assert "cannot read the nodes of the cluster" in capsys.readouterr().err


def test_bad_entrypoint_resources_are_a_usage_error(tmp_path, capsys):
    rc = main(["submit", str(_config(tmp_path)), "--working-dir", str(tmp_path), "--no-check",
               "--entrypoint-resources", "[1]"])
    assert rc == 2 and "expected a JSON object" in capsys.readouterr().err
