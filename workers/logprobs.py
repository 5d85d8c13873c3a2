"""Per-sequence log-probs of response tokens from a HF causal LM.

A pair batch is laid out as one forward over ``[chosen; rejected]`` rows, each row
``prompt + response`` right-padded. Only response positions go through the LM head, in
chunks that are recomputed in backward, so full-vocabulary logits never exist for the
whole batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class PairBatch:
    """Token tensors for B pairs laid out as 2B rows: chosen rows first, then rejected."""

    input_ids: torch.Tensor  # [2B, T] long
    attention_mask: torch.Tensor  # [2B, T] long
    response_mask: torch.Tensor  # [2B, T] bool, True at positions whose next token is a response token
    num_pairs: int

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device),
                         self.response_mask.to(device), self.num_pairs)

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


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
    return PairBatch(input_ids, attention_mask, response_mask, len(prompt_ids))


def _token_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return torch.gather(logits, -1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def response_token_logps(model: torch.nn.Module, batch: PairBatch, chunk_size: int = 4096,
                         position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probs of every response token, flattened in row-major order: shape [N_response]."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=position_ids).last_hidden_state
    targets = batch.input_ids[:, 1:][batch.response_mask[:, :-1]]
    selected = hidden[:, :-1][batch.response_mask[:, :-1]]
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
    """Summed response log-probs and response token counts per row: ([2B] float32, [2B] long)."""
    mask = batch.response_mask[:, :-1]
    counts = mask.sum(dim=1)
    token_logps = response_token_logps(model, batch, chunk_size)
    row_of_token = torch.repeat_interleave(torch.arange(mask.shape[0], device=counts.device), counts)
    sums = torch.zeros(mask.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, row_of_token, token_logps)
    return sums, counts


class ResponseLogps(torch.nn.Module):
    """Wraps a causal LM so that forward returns response-token log-probs.

    DeepSpeed wraps this module (not the bare LM), so its engine's forward/backward
    bookkeeping sees the whole log-prob computation. The LM stays at ``.lm``.
    """

    def __init__(self, lm: torch.nn.Module, chunk_size: int = 4096):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        batch = PairBatch(input_ids, attention_mask, response_mask, input_ids.shape[0] // 2)
        return response_token_logps(self.lm, batch, self.chunk_size, position_ids)
