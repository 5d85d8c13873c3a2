"""Pair-aware packing: several pairs' sequences share one row, attention stays per sequence.

A pair is two sequences, ``prompt + chosen`` and ``prompt + rejected``; the pair is the
packing unit (both sequences land in the same row, side by side), and rows are filled
first-fit-decreasing up to a token budget. Position ids restart at 0 for every sequence,
so rotary embeddings see exactly what they would see unpacked, and attention is confined
to each sequence one of two ways:

- ``"mask"``: an explicit [R, 1, T, T] block-diagonal causal mask, which eager and SDPA
  attention take as is. The CPU path and the numerical reference.
- ``"position_ids"``: no mask; the model finds the sequence boundaries from the position
  ids (transformers' packed-sequence detection), which routes flash-attn to its varlen
  kernel and builds a FlexAttention block mask. The GPU path.

The result is an ordinary `PairBatch`: the trainer and the DeepSpeed-wrapped
`ResponseLogps` run the same code for packed and unpacked batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from workers.logprobs import PairBatch

PackedAttention = Literal["mask", "position_ids"]


def attention_mode(model: torch.nn.Module) -> PackedAttention:
    """How a model confines attention in a packed row: an explicit mask for eager/SDPA,
    position-id boundaries for the varlen kernels (flash-attn, FlexAttention)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return "mask" if impl in ("eager", "sdpa") else "position_ids"


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`, longest first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"item {i} has {lengths[i]} tokens, over the row budget {capacity}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def block_causal_mask(seq_id: torch.Tensor) -> torch.Tensor:
    """[R, 1, T, T] bool, True where query t may attend key s: same sequence and s <= t.
    Padding (seq_id -1) attends to padding only, so no row of the mask is empty."""
    same = seq_id[:, :, None] == seq_id[:, None, :]
    t = seq_id.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq_id.device).tril()
    return (same & causal)[:, None]


def pack_pairs(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
               rejected_ids: Sequence[Sequence[int]], pad_id: int,
               attention: PackedAttention = "mask", row_tokens: int | None = None) -> PairBatch:
    """Pack B pairs into rows of at most max(row_tokens, longest pair) tokens."""
    n = len(prompt_ids)
    seqs = [[int(t) for t in p] + [int(t) for t in r]
            for responses in (chosen_ids, rejected_ids) for p, r in zip(prompt_ids, responses)]
    starts = [len(p) for p in prompt_ids] * 2
    pair_len = [len(seqs[i]) + len(seqs[n + i]) for i in range(n)]
    rows = first_fit_decreasing(pair_len, max(max(pair_len), row_tokens or 0))
    width = max(sum(pair_len[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    seq_id = torch.full((len(rows), width), -1, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, row in enumerate(rows):
        col = 0
        for s in (k for i in row for k in (i, n + i)):
            length = len(seqs[s])
            input_ids[r, col : col + length] = torch.tensor(seqs[s], dtype=torch.long)
            position_ids[r, col : col + length] = torch.arange(length)
            seq_id[r, col : col + length] = s
            response_mask[r, col + starts[s] - 1 : col + length - 1] = True
            col += length
        position_ids[r, col:] = torch.arange(width - col)  # padding: a sequence of its own
    seq_of_token = seq_id[:, :-1][response_mask[:, :-1]]
    return PairBatch(
        input_ids=input_ids,
        attention_mask=block_causal_mask(seq_id) if attention == "mask" else None,
        response_mask=response_mask, num_pairs=n,
        counts=torch.bincount(seq_of_token, minlength=2 * n),
        real_tokens=sum(pair_len), position_ids=position_ids,
        order=torch.argsort(seq_of_token, stable=True))
