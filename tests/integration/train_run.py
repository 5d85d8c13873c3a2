"""Running the train stage in a test: `run_train` with a metrics sink actor, reading back
the metric rows it wrote."""

from __future__ import annotations

import json


def train(cfg, data, tmp_path, name="run", env=None):
    """run_train with a metrics sink (and extra worker env vars); returns (result, metric
    rows, output dir)."""
    import ray

    from pipeline.cluster import worker_env
    from pipeline.stages.train import run_train
    from workers.metrics_sink import MetricsSink

    path = tmp_path / f"{name}-metrics.jsonl"
    sink = ray.remote(MetricsSink).options(num_cpus=0).remote(str(path), {})
    out = tmp_path / f"{name}-out"
    out.mkdir()
    try:
        result = run_train(data, cfg.model.policy, cfg, out, tmp_path / f"{name}-storage",
                           {**worker_env(cfg), **(env or {})}, sink)
    finally:
        ray.get(sink.set_context.remote())
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return result, rows, out
