"""Running the train stage in a test: `run_train` on a TrainerSession with a metrics sink
actor, reading back the metric rows it wrote."""

from __future__ import annotations

import json


def read_rows(path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if r["kind"] == kind]


def train(cfg, data, tmp_path, name="run", env=None):
    """One round of run_train on its own trainer (one fit), with a metrics sink (and extra
    worker env vars); returns (result, train metric rows, output dir)."""
    results, path, outs = train_rounds(cfg, [data], tmp_path, name, env)
    return results[0], read_rows(path), outs[0]


def train_rounds(cfg, datas, tmp_path, name="run", env=None, policy=None):
    """Round after round of run_train on one trainer (one fit): round k starts from round
    k-1's exported model. Returns (results, metrics.jsonl path, output dirs)."""
    import ray

    from pipeline.cluster import worker_env
    from pipeline.stages.train import TrainerSession, run_train
    from workers.metrics_sink import MetricsSink

    path = tmp_path / f"{name}-metrics.jsonl"
    sink = ray.remote(MetricsSink).options(num_cpus=0).remote(str(path), {})
    trainer = TrainerSession(cfg, tmp_path / f"{name}-storage",
                             {**worker_env(cfg), **(env or {})}, sink)
    policy, results, outs, ok = policy or cfg.model.policy, [], [], False
    try:
        for k, data in enumerate(datas):
            out = tmp_path / f"{name}-out" if len(datas) == 1 else tmp_path / f"{name}-out-{k}"
            out.mkdir()
            ray.get(sink.set_context.remote(round=k, stage="train"))
            results.append(run_train(data, policy, cfg, out, trainer, round_index=k,
                                     key=f"{name}-{k}"))
            outs.append(out)
            policy = str(out / results[-1]["model_dir"])  # with LoRA, the adapter
        ok = True
    finally:
        trainer.close(ok=ok)
        ray.get(sink.set_context.remote())
    return results, path, outs
