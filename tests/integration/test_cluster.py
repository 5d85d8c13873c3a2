"""Two real Ray nodes on this machine (cluster/local-two-nodes.sh), a run submitted to them
as a Ray job with `rayalign submit`, and the dashboard's Prometheus endpoints scraped.

The head carries the custom resource `head_node`, the second node `worker_node`. The run
pins its vLLM pools to `head_node` and its Ray Train workers to `worker_node`; the test
reads where the job's actors really ran from Ray's state API, and its results from the
run directory the job wrote. Every process the cluster started is stopped by pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local-two-nodes.sh"
BIN = Path(sys.executable).parent
SECRET = "hf_not-a-real-token-7f3a9c"


@dataclass
class TwoNodes:
    gcs: str
    dashboard: str
    metrics: dict[str, int]  # node role → Prometheus port
    env: dict[str, str]


def _free_port(avoid: range = range(10002, 20000)) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:  # Ray's default worker ports
            return port


@pytest.fixture(scope="module")
def two_nodes():
    root = Path(tempfile.mkdtemp(prefix="ra2n-", dir="/tmp"))  # short: unix socket paths
    ports = {k: _free_port() for k in ("GCS_PORT", "DASHBOARD_PORT", "CLIENT_PORT",
                                       "HEAD_METRICS_PORT", "WORKER_METRICS_PORT",
                                       "HEAD_AGENT_PORT", "WORKER_AGENT_PORT")}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()},
           "RAY": str(BIN / "ray"), "RAYALIGN_CLUSTER_DIR": str(root), "RAY_AUTH_MODE": "disabled",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "HEAD_CPUS": "2", "WORKER_CPUS": "2",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAYALIGN_CLUSTER_ID", None)
    try:
        subprocess.run([str(SCRIPT), "start"], env=env, check=True, timeout=180,
                       capture_output=True, text=True)
        yield TwoNodes(f"127.0.0.1:{ports['GCS_PORT']}",
                       f"http://127.0.0.1:{ports['DASHBOARD_PORT']}",
                       {"head": ports["HEAD_METRICS_PORT"], "worker": ports["WORKER_METRICS_PORT"]},
                       env)
    finally:
        out = subprocess.run([str(SCRIPT), "stop"], env=env, timeout=60, capture_output=True,
                             text=True, check=False)
        print(out.stdout, out.stderr)
        shutil.rmtree(root, ignore_errors=True)


def rayalign(cluster: TwoNodes, *args: str, timeout: float = 120,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rayalign"), *args], env={**cluster.env, **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def scrape(port: int) -> dict[str, list[tuple[str, float]]]:
    """Prometheus text format → {metric name: [(labels, value), ...]}."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and not line.startswith("#"):
            out.setdefault(m.group(1), []).append((m.group(2) or "", float(m.group(3))))
    return out


def rayalign_series(cluster: TwoNodes, run: str) -> set[str]:
    """Names of our series on any node whose `run` tag is `run`."""
    return {name for port in cluster.metrics.values() for name, samples in scrape(port).items()
            if "rayalign_" in name and any(f'run="{run}"' in labels for labels, _ in samples)}


def state_query(cluster: TwoNodes, code: str) -> object:
    """Run `code` (which prints JSON) against the cluster's state API in a fresh process."""
    out = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dashboard_metrics_from_the_sink_are_scraped(two_nodes, tmp_path):
    """A MetricsSink actor pinned to the second node exports every documented metric."""
    from workers.metrics_sink import EXPORTED, QUARANTINED, STAGE_PROGRESS, TRAIN_STEPS

    driver = subprocess.Popen([sys.executable, "-c", f"""
import time, ray
from workers.metrics_sink import MetricsSink
ray.init(address="{two_nodes.gcs}", log_to_driver=False)
sink = ray.remote(MetricsSink).options(num_cpus=0, resources={{"worker_node": 0.01}}).remote(
    "{tmp_path / 'metrics.jsonl'}", {{"run_dir": "/runs/metrics-test"}})
ray.get(sink.set_context.remote(round=0, stage="train"))
ray.get(sink.plan.remote("train", 4, 0.1))
ray.get(sink.log.remote("prepare", {{"split": "train", "pairs": 61, "quarantined": 3}}))
for step in (1, 2):
    ray.get(sink.log.remote("train", {{"step": step, "loss": 0.5, "rewards/margins": 0.2,
        "rewards/accuracies": 0.75, "ranking/accuracy": 0.5, "principled/target_mean": 3.0,
        "principled/gap_to_target": 1.0, "tokens_per_s": 1234.0}}))
ray.get(sink.log.remote("eval", {{"eval/rewards/accuracies": 0.625, "eval/rewards/margins": 0.1,
    "eval/ranking/accuracy": 0.5, "eval/win_rate": 0.55, "eval/kl": 0.02}}))
print("READY", flush=True)
time.sleep(300)
"""], env=two_nodes.env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert driver.stdout.readline().strip() == "READY"
        # Ray's Prometheus exporter adds its `ray_` prefix (documented in the README)
        wanted = {f"ray_{e.name}" for e in [*EXPORTED, STAGE_PROGRESS, TRAIN_STEPS, QUARANTINED]}
        deadline = time.time() + 90
        found: dict[str, list[tuple[str, float]]] = {}
        while time.time() < deadline:
            found = scrape(two_nodes.metrics["worker"])
            if wanted <= set(found):
                break
            time.sleep(2)
        print("exported:", sorted(n for n in found if "rayalign_" in n))
        missing = sorted(wanted - set(found))
        assert not missing, f"not on the worker node's metrics endpoint: {missing}"

        def value(name: str, **labels: str) -> float:
            [(lab, v)] = [(lab, v) for lab, v in found[f"ray_{name}"]
                          if all(f'{k}="{x}"' in lab for k, x in labels.items())]
            assert 'run="metrics-test"' in lab
            return v

        assert value("rayalign_train_loss") == 0.5
        assert value("rayalign_train_logit_gap") == pytest.approx(2.0)  # margin 0.2 / β 0.1
        assert value("rayalign_train_target_gap") == 3.0
        assert value("rayalign_train_tokens_per_second") == 1234.0
        assert value("rayalign_stage_progress", stage="train") == pytest.approx(0.5)
        assert value("rayalign_stage_progress", stage="evaluate") == 1.0
        assert value("rayalign_train_steps_total") == 2.0
        assert value("rayalign_rows_quarantined_total", split="train") == 3.0
        assert value("rayalign_eval_win_rate") == pytest.approx(0.55)
        # nothing of ours on the head node: the sink ran where it was pinned
        assert not [n for n in scrape(two_nodes.metrics["head"]) if "rayalign_" in n]
    finally:
        driver.kill()
        driver.wait(timeout=30)


def _write_config(make_config, path: Path, run_dir: Path, **sections) -> Path:
    cfg = make_config(run_dir, **sections)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


PINNED = {"train": {"resources": {"worker_node": 1}, "placement_strategy": "STRICT_PACK"},
          "ray": {"num_cpus": None}}


def test_dry_run_and_submit_refuse_an_impossible_placement(two_nodes, make_config, tmp_path):
    config = _write_config(make_config, tmp_path / "bad.yaml", tmp_path / "run",
                           reference={"resources": {"gpu_node": 0.01}}, **PINNED)
    ok = _write_config(make_config, tmp_path / "ok.yaml", tmp_path / "run", **PINNED)
    dry = rayalign(two_nodes, "run", str(config), "--dry-run", "--ray-address", two_nodes.gcs)
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert "2 node(s)" in dry.stdout and "worker_node 100" in dry.stdout
    assert "stage 'reference'" in dry.stdout and "no node has the custom resource(s) 'gpu_node'" \
        in dry.stdout
    sub = rayalign(two_nodes, "submit", str(config), "--address", two_nodes.dashboard,
                   "--working-dir", str(tmp_path))
    assert sub.returncode == 1 and "cannot run this config" in sub.stderr
    assert "submitted job" not in sub.stdout
    fits = rayalign(two_nodes, "run", str(ok), "--dry-run", "--ray-address", two_nodes.gcs)
    assert "no problems found." in fits.stdout, fits.stdout + fits.stderr


def test_submitted_run_places_stages_on_their_nodes(two_nodes, make_config, tmp_path):
    work, run_dir = tmp_path / "work", tmp_path / "submitted-run"
    work.mkdir()
    config = _write_config(
        make_config, work / "run.yaml", run_dir, reference={"resources": {"head_node": 1},
                                               "cache_dir": str(tmp_path / "ref-cache")},
        sampling={"resources": {"head_node": 1}}, **PINNED)
    out_file = tmp_path / "submit.out"  # a file, not a pipe: the streamed logs are large
    with out_file.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "rayalign"), "submit", str(config), "--address", two_nodes.dashboard,
             "--working-dir", str(work), "--env", "HF_TOKEN", "--entrypoint-resources",
             '{"head_node": 1}', "--wait"], env={**two_nodes.env, "HF_TOKEN": SECRET},
            stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        seen: set[str] = set()
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:  # scrape while the job runs
            seen |= rayalign_series(two_nodes, run_dir.name)
            time.sleep(3)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    submit_out = out_file.read_text()
    assert proc.returncode == 0, submit_out[-4000:]
    job = re.search(r"submitted job (\S+)", submit_out).group(1)
    assert f"{two_nodes.dashboard}/#/jobs/{job}" in submit_out
    assert "env vars passed (values hidden): HF_TOKEN" in submit_out

    status = rayalign(two_nodes, "status", job, "--address", two_nodes.dashboard)
    logs = rayalign(two_nodes, "logs", job, "--address", two_nodes.dashboard)
    assert "SUCCEEDED" in status.stdout and '"HF_TOKEN": "<hidden>"' in status.stdout
    assert "trained" in logs.stdout
    for text in (submit_out, status.stdout, status.stderr, logs.stdout, logs.stderr):
        assert SECRET not in text
    ray_job = re.search(r"ray_job_id:\s+(\S+)", status.stdout).group(1)

    # The job's own records: its actors (Ray state API) and the run dir it wrote.
    placed = state_query(two_nodes, f"""
import json
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_nodes
nodes = {{n.node_id: n.resources_total for n in list_nodes(address="{two_nodes.dashboard}")}}
actors = list_actors(address="{two_nodes.dashboard}", filters=[("job_id", "=", "{ray_job}")],
                     detail=True, limit=10000)
job = JobSubmissionClient("{two_nodes.dashboard}").get_job_info("{job}")
def role(node_id):
    return "head" if "head_node" in nodes[node_id] else "worker"
print(json.dumps({{"actors": [[a.class_name, role(a.node_id)] for a in actors if a.node_id],
                  "driver": role(job.driver_node_id),
                  "env": sorted((job.runtime_env or {{}}).get("env_vars", {{}}))}}))
""")
    by_class: dict[str, set[str]] = {}
    for cls, role in placed["actors"]:
        by_class.setdefault(cls, set()).add(role)
    print("actors by node:", by_class)
    trainers = [c for c in by_class if "RayTrainWorker" in c]
    assert trainers and "Engine" in by_class, by_class
    assert all(by_class[c] == {"worker"} for c in trainers)
    assert by_class["Engine"] == {"head"}  # the engines hold the pinned resources
    assert placed["driver"] == "head"
    assert placed["env"] == ["HF_TOKEN"]  # reached the job; its value was never printed

    train = json.loads((run_dir / "round-0" / "train" / "manifest.json").read_text())
    assert train["outputs"]["optimizer_steps"] >= 1
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" for r in steps) and any(r["kind"] == "eval" for r in steps)
    print("metrics seen while the job ran:", sorted(seen))
    assert {"ray_rayalign_train_loss", "ray_rayalign_stage_progress"} <= seen
