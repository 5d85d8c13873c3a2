"""A round's weights into a running vLLM engine: from Ray's object store
(`train.weight_transfer: object_store`) vs from the exported checkpoint on disk (vLLM's
`reload_weights(weights_path)`, `weight_transfer: disk`, the default), on the same engine,
same weights, in the same run.

The model is the bench model's family at the Qwen2.5-0.5B body (hidden 896, 24 layers, 14
heads, 2 KV heads, MLP 4864; the toy vocabulary, tied embeddings; float32 on CPU), so a
round's weights are ~1.4 GB rather than the toy model's 2 MB. Each round makes new weights
(every tensor moved), then, in alternating order:

- disk: the trainer side writes them as safetensors (`save_file`, what the export does in
  both routes), the engine loads that file (`Engine.update_weights`);
- object store: the trainer side puts them, a decoder layer per object
  (`workers.weight_sync.offer`, from this process as rank 0 does), the engine gets them and
  loads them from memory (`Engine.receive_weights`).

After each load the engine's log-probs of a few sequences are read; both routes must give
the same numbers (the same weights), else the script exits 1. Reported: the engine-side
update seconds of each route (the engine's own clock: get/read + reload + tied-head repack +
prefix-cache reset), the caller's round trip, the trainer-side put (object store only: the
export's write happens in both routes), and their ratio. Last, the wire: the same layer
groups put as torch tensors (which Ray pickles) and as the numpy arrays weight_sync sends
(raw buffers), then got as tensors in another process that has imported torch already
(torch: unpickled, a copy; numpy: the store's memory mapped, `from_wire`, no copy; the
engine's load copies either once more), each twice in the order torch, numpy, numpy, torch:
the faster of each.

    .venv/bin/python bench/bench_weight_update.py [--rounds 3] [--layers 24]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fixtures import CACHE, build_bench_model, local_ray
from harness import emit, line, machine, ratio_line

SHAPE = {"hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
         "intermediate_size": 4864}  # Qwen2.5-0.5B's body
PROMPTS = [[1, 270, 201, 357], [1, 312, 361, 40, 41], [1, 42]]
RESPONSES = [[43, 44, 45, 46], [47, 48], [49, 50, 51, 52, 53, 54]]
ENGINE = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True,
          "kv_cache_space_gib": 1, "call_timeout_s": 600}


def moved(weights: dict, seed: int) -> dict:
    """Every tensor moved by 2% of its spread (seeded): a round's new weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g) for k, v in weights.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=24)
    args = ap.parse_args()

    import ray
    from safetensors.torch import load_file, save_file

    from workers.vllm_pool import Engine, weights_id
    from workers.weight_sync import nbytes, offer

    model_dir = build_bench_model(CACHE / f"qwen2-0.5b-body-{args.layers}l",
                                  num_hidden_layers=args.layers, **SHAPE)
    base = load_file(str(model_dir / "model.safetensors"))
    size = nbytes(base.items())
    emit(line("machine", machine()),
         line("model", f"{model_dir.name}: {sum(v.numel() for v in base.values()) / 1e6:.0f}M"
                       f" parameters, {size / 2**30:.2f} GiB of float32 tensors"))
    work = Path(tempfile.mkdtemp(prefix="weight-update-", dir=CACHE))
    seconds: dict[str, list[float]] = {"disk": [], "object_store": []}
    wall: dict[str, list[float]] = {"disk": [], "object_store": []}
    trainer: dict[str, list[float]] = {"save": [], "put": []}
    try:
        with local_ray(num_cpus=4):
            engine = ray.remote(Engine).options(num_cpus=0).remote(str(model_dir), ENGINE)
            t0 = time.perf_counter()
            ray.get(engine.ready.remote())
            emit(line("engine start", time.perf_counter() - t0, "s"))
            version = 0
            for k in range(args.rounds):
                new = moved(base, seed=k + 1)
                out = work / f"round-{k}"
                shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
                t0 = time.perf_counter()
                save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
                trainer["save"].append(time.perf_counter() - t0)
                logps = {}
                for route in (("disk", "object_store") if k % 2 == 0 else
                              ("object_store", "disk")):
                    version += 1
                    t0 = time.perf_counter()
                    if route == "disk":
                        ref = engine.update_weights.remote(str(out), version)
                    else:
                        refs = offer(new)
                        trainer["put"].append(time.perf_counter() - t0)
                        ref = engine.receive_weights.remote(refs, str(out), weights_id(str(out)),
                                                            version)
                    info = ray.get(ref)
                    wall[route].append(time.perf_counter() - t0)
                    assert info["via"] == route, info
                    seconds[route].append(info["seconds"])
                    logps[route] = ray.get(engine.sequence_logprobs.remote(PROMPTS, RESPONSES))
                    ref = refs = None  # the objects are freed
                gap = max(abs(a - b) for u, v in zip(logps["disk"], logps["object_store"])
                          for a, b in zip(u, v))
                emit(line(f"round {k}: engine update, disk / object store",
                          f"{seconds['disk'][-1]:.3f} s / {seconds['object_store'][-1]:.3f} s;"
                          f" log-prob gap between the routes {gap:.2g}"))
                if gap > 1e-5:
                    emit("FAILED: the two routes loaded different weights")
                    return 1
            ray.kill(engine)
            wire = compare_wires(base)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in {**seconds, **trainer}.items()}
    walls = {k: statistics.median(v) for k, v in wall.items()}
    emit(line(f"engine update from disk (median of {args.rounds})", med["disk"], "s"),
         line(f"engine update from the object store (median of {args.rounds})",
              med["object_store"], "s"),
         line("caller's round trip, disk / object store (put included)",
              f"{walls['disk']:.3f} s / {walls['object_store']:.3f} s"),
         line("trainer side: safetensors write (both routes, the export)", med["save"], "s"),
         line("trainer side: object store put (object_store only)", med["put"], "s"),
         line("engine update throughput, object store", size / med["object_store"] / 2**30,
              "GiB/s"),
         ratio_line("engine update, disk / object store", med["disk"], med["object_store"]),
         ratio_line("round trip, disk / object store", walls["disk"], walls["object_store"]))
    for what in ("put", "get in another process"):
        emit(line(f"wire, {what}: torch tensors (pickled) / numpy arrays (workers.weight_sync)",
                  f"{wire['torch'][what]:.3f} s / {wire['numpy'][what]:.3f} s"),
             ratio_line(f"wire, {what}, torch / numpy", wire["torch"][what], wire["numpy"][what]))
    return 0


def compare_wires(weights: dict) -> dict[str, dict[str, float]]:
    """The same layer groups put into the object store as torch tensors and as the numpy
    arrays workers.weight_sync sends, then got as tensors by an actor (another process, as
    the engine is, torch imported before): the faster of two tries of each, in the order
    torch, numpy, numpy, torch (seconds)."""
    import ray

    from workers.weight_sync import layer_groups, to_wire

    class Getter:
        def __init__(self):
            import torch  # noqa: F401 (imported before any timing)

        def get(self, refs: list, wire: str) -> float:
            from workers.weight_sync import from_wire

            t0 = time.perf_counter()
            groups = ray.get(refs)
            if wire == "numpy":
                [from_wire(d, a) for g in groups for _, d, a in g]
            return time.perf_counter() - t0

    getter = ray.remote(Getter).options(num_cpus=0).remote()
    groups = list(layer_groups(weights))
    out: dict[str, dict[str, float]] = {}
    for wire in ("torch", "numpy", "numpy", "torch"):
        encode = to_wire if wire == "numpy" else (lambda t: t)
        t0 = time.perf_counter()
        refs = [ray.put([(n, *encode(t)) if wire == "numpy" else (n, t) for n, t in g])
                for g in groups]
        put = time.perf_counter() - t0
        got = ray.get(getter.get.remote(refs, wire))
        del refs
        best = out.setdefault(wire, {"put": put, "get in another process": got})
        best["put"], best["get in another process"] = (min(best["put"], put),
                                                       min(best["get in another process"], got))
    ray.kill(getter)
    return out


if __name__ == "__main__":
    sys.exit(main())
