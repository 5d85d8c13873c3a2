"""cluster/: the KubeRay manifests against the KubeRay CRD schemas (vendored, offline), the
cluster-launcher example against Ray's own config validator, and the demo job's placement
against the resources those manifests declare."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.config import load_config
from pipeline.plan import Resources, check_plan, stage_plans

ROOT = Path(__file__).resolve().parents[3]
CRDS = ROOT / "tests" / "data" / "kuberay"
KUBERAY = ROOT / "cluster" / "kuberay"


def strict(schema: Any) -> Any:
    """The API server's strict field validation (kubectl's default): an object schema that
    lists its properties rejects other keys, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validator(name: str) -> tuple[jsonschema.Draft7Validator, dict[str, Any]]:
    crd = json.loads((CRDS / f"{name}.schema.json").read_text())
    return jsonschema.Draft7Validator(strict(crd["schema"])), crd


def errors(name: str, manifest: dict[str, Any]) -> list[str]:
    v, crd = validator(name)
    found = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
             for e in v.iter_errors(manifest)]
    if (manifest.get("apiVersion"), manifest.get("kind")) != (crd["apiVersion"], crd["kind"]):
        found.append(f"apiVersion/kind {manifest.get('apiVersion')}/{manifest.get('kind')}")
    return found


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((KUBERAY / name).read_text())


@pytest.mark.parametrize("schema, manifest", [("raycluster-v1", "raycluster.yaml"),
                                              ("rayjob-v1", "rayjob-demo.yaml")])
def test_manifest_matches_crd(schema, manifest):
    assert errors(schema, load(manifest)) == []


@pytest.mark.parametrize("path, value, expect", [
    (("spec", "workerGroupSpec"), [], "'workerGroupSpec' was unexpected"),
    (("spec", "workerGroupSpecs", 0, "replicas"), "one", "is not of type 'integer'"),
    (("spec", "headGroupSpec", "template", "spec", "containers", 0, "name"), None,
     "is not of type 'string'"),
    (("spec", "headGroupSpec", "template", "spec", "containers", 0, "ports", 0, "containerPort"),
     None, "is not of type 'integer'"),
])
def test_schema_rejects_broken_raycluster(path, value, expect):
    broken = copy.deepcopy(load("raycluster.yaml"))
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert any(expect in e for e in errors("raycluster-v1", broken)), errors("raycluster-v1", broken)


def test_rayjob_without_entrypoint_target_is_rejected():
    job = load("rayjob-demo.yaml")
    job["spec"]["entrypointNumCpus"] = "one"
    job["spec"]["submisionMode"] = "K8sJobMode"
    found = errors("rayjob-v1", job)
    assert any("submisionMode" in e for e in found) and any("entrypointNumCpus" in e for e in found)


def _start_params_resources(params: dict[str, str]) -> dict[str, float]:
    """KubeRay's rayStartParams → the node's Ray resources (CPU, GPU, custom)."""
    custom = json.loads(params.get("resources", '"{}"').strip("'\"").replace('\\"', '"') or "{}")
    return {"CPU": float(params.get("num-cpus", 0)), "GPU": float(params.get("num-gpus", 0)),
            **custom}


def test_demo_job_fits_the_declared_cluster():
    cluster, job = load("raycluster.yaml"), load("rayjob-demo.yaml")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    head = _start_params_resources(cluster["spec"]["headGroupSpec"]["rayStartParams"])
    groups = cluster["spec"]["workerGroupSpecs"]
    workers = [_start_params_resources(g["rayStartParams"]) for g in groups
               for _ in range(g["minReplicas"])]
    for g in groups:  # the pod asks Kubernetes for the GPUs Ray is told about
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(limits.get("nvidia.com/gpu", 0)) == float(g["rayStartParams"]["num-gpus"])
    config = re.search(r"(/opt/rayalign/\S+\.yaml)", job["spec"]["entrypoint"]).group(1)
    local = ROOT / config.removeprefix("/opt/rayalign/")
    assert local.is_file(), f"the image copies {local.relative_to(ROOT)} to {config}"
    cfg = load_config(local)
    have = Resources([head, *workers], "raycluster.yaml")
    assert check_plan(stage_plans(cfg), have) == []
    for name in json.loads(job["spec"]["entrypointResources"]):
        assert name in head  # the driver is pinned to the head
    # without the GPU group, the same config is refused
    assert check_plan(stage_plans(cfg), Resources([head], "head only"))


def test_cluster_launcher_example_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / "cluster-launcher.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    gpu = raw["available_node_types"]["gpu"]["resources"]
    assert "gpu_node" in gpu and "head_node" in raw["available_node_types"]["head"]["resources"]
    raw["available_node_types"]["gpu"]["min_worker"] = 1  # a typo must not pass
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(raw))


def test_local_two_nodes_script_is_valid_bash():
    import subprocess

    script = ROOT / "cluster" / "local-two-nodes.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 2 and "usage" in out.stderr
