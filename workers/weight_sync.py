"""A round's trained weights, handed from the trainer to the engines through Ray's object store.

After a round, rank 0 of the trainer holds the consolidated weights it just exported (the
ZeRO-3 shards gathered one parameter at a time by DeepSpeed). Besides writing them to
out_dir/model (what resume and a restarted engine load), it puts them into Ray's object
store, one decoder layer per object (`offer`). The driver passes those references to the
policy engines when it next needs the round's weights (pipeline.engines), and each engine
loads them in place from memory (`receive`): no file is read for the update. (The exported
files stay what a restarted engine and the fallback below load, so the run directory is
still on storage every node sees, as the rest of the pipeline needs.)

The references are owned by rank 0's process: if it dies (a worker-group restart) they are
lost, and an engine loads the exported files instead (workers.vllm_pool.Engine.receive_weights).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch


def layer_of(name: str) -> str:
    """The group a parameter belongs to: its name up to the first integer segment (a decoder
    layer: `model.layers.3.mlp.up_proj.weight` → `model.layers.3`), else the name itself
    (embeddings, final norm, LM head)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return name


def layer_groups(weights: dict[str, torch.Tensor]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`weights` as consecutive groups of one decoder layer each (un-indexed names alone), in
    the order of the state dict, each tensor detached, on the CPU and contiguous (copied
    only where it was not)."""
    group: list[tuple[str, torch.Tensor]] = []
    current = None
    for name, tensor in weights.items():
        layer = layer_of(name)
        if group and layer != current:
            yield group
            group = []
        current = layer
        group.append((name, tensor.detach().to("cpu").contiguous()))
    if group:
        yield group


def to_wire(tensor: torch.Tensor) -> tuple[str, np.ndarray]:
    """A CPU tensor as (dtype name, numpy array sharing its memory): Ray stores numpy arrays
    as raw buffers and hands them back without a copy (a torch tensor goes through pickle:
    a full copy; `bench/bench_weight_update.py` measured 3.9x slower to put and 1.5 s against
    0.004 s to get for 1.34 GiB).
    bfloat16, which numpy lacks, travels as its 16 bits."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if tensor.dtype == torch.bfloat16:
        return dtype, tensor.view(torch.int16).numpy()
    return dtype, tensor.numpy()


def from_wire(dtype: str, array: np.ndarray) -> torch.Tensor:
    """The tensor `to_wire` sent, on `array`'s memory (no copy; read-only when the array comes
    from the object store: a loader copies it into its parameters)."""
    with warnings.catch_warnings():  # torch warns on wrapping a read-only array
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def offer(weights: dict[str, torch.Tensor]) -> list[Any]:
    """Put `weights` (HF names) into Ray's object store, a decoder layer per object (the put
    copies them: training may go on): the references, in order."""
    import ray

    return [ray.put([(name, *to_wire(t)) for name, t in group])
            for group in layer_groups(weights)]


def receive(refs: Iterable[Any], timeout_s: float) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs behind `offer`'s references, in order, on the object store's
    memory (raises ray.exceptions.ObjectLostError if they are gone with their owner, or
    GetTimeoutError after `timeout_s`)."""
    import ray

    return [(name, from_wire(dtype, array))
            for group in ray.get(list(refs), timeout=timeout_s) for name, dtype, array in group]


def nbytes(weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in weights)
