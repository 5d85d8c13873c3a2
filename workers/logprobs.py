"""Per-sequence log-probs of response tokens from a HF causal LM.

A pair batch is laid out as one forward over ``[chosen; rejected]`` rows, each row
``prompt + response`` right-padded. Only response positions go through the LM head, in
chunks that are recomputed in backward, so full-vocabulary logits never exist for the
whole batch at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class PairBatch:
    """Token tensors for B pairs: 2B sequences (chosen first, then rejected) laid out in rows.

    Unpacked (`collate_pairs`): one sequence per row, right-padded, ``attention_mask`` the
    [R, T] padding mask. Packed (`workers.packing.pack_pairs`): several sequences per row,
    ``position_ids`` restart at 0 for each, and ``attention_mask`` is either a [R, 1, T, T]
    bool block-diagonal causal mask or None (the model then derives the sequence boundaries
    from the position ids: flash-attn varlen, FlexAttention). ``order`` gathers the
    row-major response log-probs into sequence order; ``counts`` are response tokens per
    sequence.
    """

    input_ids: torch.Tensor  # [R, T] long
    attention_mask: torch.Tensor | None  # [R, T] long, [R, 1, T, T] bool, or None
    response_mask: torch.Tensor  # [R, T] bool, True at positions whose next token is a response token
    num_pairs: int
    counts: torch.Tensor  # [2B] long: response tokens of each sequence
    real_tokens: int  # non-padding tokens
    position_ids: torch.Tensor | None = None  # [R, T] long
    order: torch.Tensor | None = None  # [N_response] long, None when rows are already in sequence order

    def to(self, device: torch.device | str) -> PairBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return PairBatch(self.input_ids.to(device), move(self.attention_mask),
                         self.response_mask.to(device), self.num_pairs, self.counts.to(device),
                         self.real_tokens, move(self.position_ids), move(self.order))

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.input_ids.numel()

    def per_sequence(self, token_logps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split flattened response log-probs (row-major, as the model returns them) into
        the 2B sequences: chosen 0..B-1, then rejected 0..B-1."""
        if self.order is not None:
            token_logps = token_logps[self.order]
        return torch.split(token_logps, self.counts.tolist())


def collate_pairs(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                  rejected_ids: Sequence[Sequence[int]], pad_id: int) -> PairBatch:
    """Right-padded ``[chosen; rejected]`` rows of ``prompt + response``."""
    rows, starts = [], []
    for responses in (chosen_ids, rejected_ids):
        for prompt, response in zip(prompt_ids, responses):
            rows.append([int(t) for t in prompt] + [int(t) for t in response])
            starts.append(len(prompt))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        # position t predicts token t+1: response token j (at index start+j) is predicted at t=start+j-1
        response_mask[i, start - 1 : len(row) - 1] = True
    return PairBatch(input_ids, attention_mask, response_mask, len(prompt_ids),
                     counts=response_mask[:, :-1].sum(dim=1), real_tokens=int(attention_mask.sum()))


def _token_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return torch.gather(logits, -1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def _model_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A 4-D bool block mask (True = attend) becomes the additive float mask every HF
    attention implementation that takes a 4-D mask understands (eager adds it, SDPA too)."""
    if attention_mask is None or attention_mask.ndim != 4 or attention_mask.dtype != torch.bool:
        return attention_mask
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(attention_mask, zero, torch.finfo(dtype).min)


def response_token_logps(model: torch.nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None, response_mask: torch.Tensor,
                         position_ids: torch.Tensor | None = None,
                         chunk_size: int = 4096) -> torch.Tensor:
    """Log-probs of every response token, flattened in row-major order: shape [N_response]."""
    backbone = getattr(model, model.base_model_prefix)
    mask = _model_mask(attention_mask, model.get_input_embeddings().weight.dtype)
    # no KV cache: with one, transformers would not detect packed sequences from position ids
    hidden = backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    targets = input_ids[:, 1:][response_mask[:, :-1]]
    selected = hidden[:, :-1][response_mask[:, :-1]]
    lm_head = model.get_output_embeddings()
    pieces = []
    for start in range(0, selected.shape[0], chunk_size):
        h, t = selected[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_token_logps, lm_head, h, t, use_reentrant=False))
        else:
            pieces.append(_token_logps(lm_head, h, t))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(model: torch.nn.Module, batch: PairBatch,
                   chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts per sequence: ([2B] float32, [2B] long)."""
    token_logps = response_token_logps(model, batch.input_ids, batch.attention_mask,
                                       batch.response_mask, batch.position_ids, chunk_size)
    sums = torch.stack([t.sum() for t in batch.per_sequence(token_logps)])
    return sums, batch.counts


class ResponseLogps(torch.nn.Module):
    """Wraps a causal LM so that forward returns response-token log-probs.

    DeepSpeed wraps this module (not the bare LM), so its engine's forward/backward
    bookkeeping sees the whole log-prob computation. The LM stays at ``.lm``. Packed and
    unpacked batches take the same call: ``attention_mask`` is the 2-D padding mask, a
    4-D block mask, or None with per-sequence ``position_ids``.
    """

    def __init__(self, lm: torch.nn.Module, chunk_size: int = 4096):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                response_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return response_token_logps(self.lm, input_ids, attention_mask, response_mask,
                                    position_ids, self.chunk_size)
