"""Pair-aware packing: several pairs' sequences share one row, attention stays per sequence.

A pair is two sequences, ``prompt + chosen`` and ``prompt + rejected``; the pair is the
packing unit (both sequences land in the same row, side by side), and rows are filled
first-fit-decreasing up to a token budget. Position ids restart at 0 for every sequence,
so rotary embeddings see exactly what they would see unpacked.

With ``share_prompt`` a pair is one document ``prompt | chosen | rejected``: the prompt is
computed once, both continuations attend to the prompt and to themselves only, and the
rejected continuation's positions restart at the prompt length. Every token then sees the
same keys at the same positions as unshared, so the log-probs are the same; the prompt's
last hidden state predicts the first token of both responses.

One rule says who may attend to whom (`document_mask_mod`: same document, causal, key on
the prompt or on the query's own branch); attention is confined to it one of three ways:

- ``"mask"``: the rule rendered as an explicit [R, 1, T, T] bool mask, which eager and SDPA
  attention take as is. The CPU path and the numerical reference.
- ``"flex"``: the rule as a FlexAttention `BlockMask`, built on the batch's device just
  before the forward (`model_attention_mask`); needs ``attn_implementation="flex_attention"``.
  Attention costs per document, not per row. A GPU path (FlexAttention has no backward on CPU).
- ``"position_ids"``: no mask; the model finds the sequence boundaries from the position
  ids (transformers' packed-sequence detection), which routes flash-attn to its varlen
  kernel. Cannot express a shared prompt.

The result is an ordinary `PairBatch`: the trainer and the DeepSpeed-wrapped
`ResponseLogps` run the same code for packed and unpacked batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from workers.logprobs import PairBatch

PackedAttention = Literal["mask", "position_ids", "flex"]
PROMPT, CHOSEN, REJECTED = 0, 1, 2  # branch ids


def attention_mode(model: torch.nn.Module) -> PackedAttention:
    """How a model confines attention in a packed row: an explicit mask for eager/SDPA, a
    FlexAttention block mask for flex_attention, position-id boundaries for flash-attn."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl in ("eager", "sdpa"):
        return "mask"
    return "flex" if impl == "flex_attention" else "position_ids"


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


def document_mask_mod(sequence_ids: torch.Tensor, branch_ids: torch.Tensor) -> Callable[..., Any]:
    """FlexAttention ``mask_mod(b, h, q, kv)``: query q may attend key kv when both are in the
    same document, kv <= q, and kv is on the prompt or on q's own branch. Padding (document
    -1, branch 0) attends to padding only, so no row is empty. Works on scalars and on
    broadcast index tensors alike."""

    def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        same_doc = sequence_ids[b, q] == sequence_ids[b, kv]
        visible = (branch_ids[b, kv] == PROMPT) | (branch_ids[b, kv] == branch_ids[b, q])
        return same_doc & visible & (kv <= q)

    return mask_mod


def block_causal_mask(seq_id: torch.Tensor, branch_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`document_mask_mod` rendered densely: [R, 1, T, T] bool, True where query t may attend
    key s."""
    rows, t = seq_id.shape
    branch = torch.zeros_like(seq_id) if branch_ids is None else branch_ids
    pos = torch.arange(t, device=seq_id.device)
    b = torch.arange(rows, device=seq_id.device)[:, None, None]
    return document_mask_mod(seq_id, branch)(b, 0, pos[None, :, None], pos[None, None, :])[:, None]


def flex_block_mask(seq_id: torch.Tensor, branch_ids: torch.Tensor | None = None) -> Any:
    """`document_mask_mod` as a FlexAttention BlockMask on `seq_id`'s device."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, t = seq_id.shape
    branch = torch.zeros_like(seq_id) if branch_ids is None else branch_ids
    return create_block_mask(document_mask_mod(seq_id, branch), B=rows, H=None, Q_LEN=t,
                             KV_LEN=t, device=seq_id.device)


def model_attention_mask(batch: PairBatch) -> Any:
    """What the model's forward takes as ``attention_mask`` for this batch: the batch's own
    mask, or for ``flex`` batches a BlockMask built now, where the batch's tensors are."""
    if not batch.flex:
        return batch.attention_mask
    return flex_block_mask(batch.sequence_ids, batch.branch_ids)


@dataclass(frozen=True)
class Segment:
    """A run of tokens placed contiguously in a row."""

    tokens: list[int]
    first_position: int
    document: int
    branch: int
    sequence: int | None  # the sequence whose response these tokens are; None for a prompt


def pair_segments(i: int, n: int, prompt: list[int], chosen: list[int], rejected: list[int],
                  share_prompt: bool) -> list[Segment]:
    """Pair i of n as segments: ``prompt chosen prompt rejected`` (two documents) or
    ``prompt chosen rejected`` (one document, the prompt shared)."""
    p = len(prompt)
    if share_prompt:
        return [Segment(prompt, 0, i, PROMPT, None), Segment(chosen, p, i, CHOSEN, i),
                Segment(rejected, p, i, REJECTED, n + i)]
    return [Segment(prompt, 0, i, PROMPT, None), Segment(chosen, p, i, CHOSEN, i),
            Segment(prompt, 0, n + i, PROMPT, None), Segment(rejected, p, n + i, REJECTED, n + i)]


def pack_pairs(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
               rejected_ids: Sequence[Sequence[int]], pad_id: int,
               attention: PackedAttention = "mask", row_tokens: int | None = None,
               share_prompt: bool = False) -> PairBatch:
    """Pack B pairs into rows of at most max(row_tokens, longest pair) tokens.

    Without `row_tokens`, the ``"mask"`` path makes rows as wide as the longest pair (its
    attention costs the whole row squared), and the per-document kernels (``"flex"``,
    ``"position_ids"``) put every pair in one row: no padding at all."""
    if share_prompt and attention == "position_ids":
        raise ValueError("a shared prompt needs an explicit mask: attention 'mask' or 'flex'")
    n = len(prompt_ids)
    segments = [pair_segments(i, n, [int(t) for t in p], [int(t) for t in c],
                              [int(t) for t in r], share_prompt)
                for i, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids))]
    pair_len = [sum(len(s.tokens) for s in segs) for segs in segments]
    default = max(pair_len) if attention == "mask" else sum(pair_len)
    rows = first_fit_decreasing(pair_len, max(max(pair_len), row_tokens or default))
    width = max(sum(pair_len[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    seq_id = torch.full((len(rows), width), -1, dtype=torch.long)
    branch_ids = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    predict: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * (2 * n)
    targets: list[list[int]] = [[] for _ in range(2 * n)]
    for r, row in enumerate(rows):
        col = prompt_end = 0
        for seg in (s for i in row for s in segments[i]):
            span = slice(col, col + len(seg.tokens))
            input_ids[r, span] = torch.tensor(seg.tokens, dtype=torch.long)
            position_ids[r, span] = torch.arange(seg.first_position,
                                                 seg.first_position + len(seg.tokens))
            seq_id[r, span], branch_ids[r, span] = seg.document, seg.branch
            if seg.sequence is None:
                prompt_end = span.stop
            else:  # the prompt's last position predicts the first response token
                cols = torch.cat([torch.tensor([prompt_end - 1]), torch.arange(col, span.stop - 1)])
                response_mask[r, cols] = True
                predict[seg.sequence], targets[seg.sequence] = r * width + cols, seg.tokens
            col = span.stop
        position_ids[r, col:] = torch.arange(width - col)  # padding: a sequence of its own
    return PairBatch(
        input_ids=input_ids,
        attention_mask=block_causal_mask(seq_id, branch_ids) if attention == "mask" else None,
        response_mask=response_mask, num_pairs=n,
        counts=torch.tensor([len(t) for t in targets], dtype=torch.long),
        real_tokens=sum(pair_len), position_ids=position_ids, sequence_ids=seq_id,
        branch_ids=branch_ids, predict_index=torch.cat(predict),
        targets=torch.tensor([tok for t in targets for tok in t], dtype=torch.long),
        flex=attention == "flex")
