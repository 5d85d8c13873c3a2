"""Per-sequence log-probs of response tokens from a HF causal LM.

A pair batch is laid out as one forward over ``[chosen; rejected]`` rows, each row
``prompt + response`` right-padded (or packed, see `workers.packing`). Only the hidden
states that predict a response token go through the LM head, in chunks that are recomputed
in backward, so full-vocabulary logits never exist for the whole batch at once: the largest
vocabulary-sized buffers are one chunk's logits (model dtype) and one float32 temporary.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class PairBatch:
    """Token tensors for B pairs: 2B sequences (chosen first, then rejected) laid out in rows.

    Unpacked (`collate_pairs`): one sequence per row, right-padded, ``attention_mask`` the
    [R, T] padding mask. Packed (`workers.packing.pack_pairs`): several sequences per row,
    ``position_ids`` restart at 0 for each (at the prompt length for a continuation of a
    shared prompt), ``sequence_ids``/``branch_ids`` say which document and branch each
    token belongs to, and ``attention_mask`` is either a [R, 1, T, T] bool mask or None (the
    model then derives the sequence boundaries from the position ids: flash-attn varlen, or
    ``flex`` asks for a FlexAttention block mask built on the device, see
    `workers.packing.model_attention_mask`).

    Which hidden state predicts which response token: either ``response_mask`` (position t
    predicts token t+1, flattened row-major and put in sequence order by ``order``), or, when
    set, ``predict_index`` (flat index into the [R*T] hidden states) with ``targets``, both
    already in sequence order. ``counts`` are response tokens per sequence.
    """

    input_ids: torch.Tensor  # [R, T] long
    attention_mask: torch.Tensor | None  # [R, T] long, [R, 1, T, T] bool, or None
    response_mask: torch.Tensor  # [R, T] bool, True at positions that predict a response token
    num_pairs: int
    counts: torch.Tensor  # [2B] long: response tokens of each sequence
    real_tokens: int  # non-padding tokens
    position_ids: torch.Tensor | None = None  # [R, T] long
    order: torch.Tensor | None = None  # [N_response] long, None when already in sequence order
    sequence_ids: torch.Tensor | None = None  # [R, T] long, document of each token, -1 = padding
    branch_ids: torch.Tensor | None = None  # [R, T] long, 0 = prompt, 1 = chosen, 2 = rejected
    predict_index: torch.Tensor | None = None  # [N_response] long, flat hidden-state index
    targets: torch.Tensor | None = None  # [N_response] long, the predicted response tokens
    flex: bool = False  # build a FlexAttention block mask from sequence_ids/branch_ids

    def to(self, device: torch.device | str) -> PairBatch:
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.input_ids.numel()

    def per_sequence(self, token_logps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split response log-probs (as the model returns them) into the 2B sequences:
        chosen 0..B-1, then rejected 0..B-1."""
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
        # position t predicts token t+1: response token j (index start+j) is predicted at start+j-1
        response_mask[i, start - 1 : len(row) - 1] = True
    return PairBatch(input_ids, attention_mask, response_mask, len(prompt_ids),
                     counts=response_mask[:, :-1].sum(dim=1), real_tokens=int(attention_mask.sum()))


class _TargetLogSoftmax(torch.autograd.Function):
    """``log_softmax(logits.float())[i, targets[i]]`` without keeping float32 logits.

    Forward keeps the logits in their own dtype and the float32 log-normaliser; backward
    builds ``grad · (onehot − softmax)`` in one float32 temporary, in place, and returns it
    in the logits' dtype, exactly what autograd through ``.float()`` + ``log_softmax`` +
    ``gather`` returns, with a third of the vocabulary-sized buffers.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits.float(), dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return logits.gather(-1, targets[:, None])[:, 0].float() - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        g = logits.to(torch.float32, copy=True).sub_(lse[:, None]).exp_().mul_(-grad[:, None])
        g.scatter_add_(-1, targets[:, None], grad[:, None])
        return g.to(logits.dtype), None


def _chunk_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                 collision: bool = False) -> torch.Tensor:
    logits = lm_head(hidden)
    logps = _TargetLogSoftmax.apply(logits, targets)
    if not collision:
        return logps
    with torch.no_grad():  # log Σ_v p(v)² of the same logits (WPO's weights), no gradient
        f = logits.float()
        log_sq = torch.logsumexp(2.0 * f, dim=-1) - 2.0 * torch.logsumexp(f, dim=-1)
    return torch.stack([logps, log_sq], dim=-1)


def head_calls(max_response_tokens: int, micro_batch_size: int, chunk_size: int) -> int:
    """LM-head calls per forward for micro-batches of up to `micro_batch_size` pairs with
    responses of up to `max_response_tokens`: enough chunks of `chunk_size` rows for the
    largest micro-batch, so typical batches keep chunks of at most `chunk_size` rows."""
    return max(1, -(-2 * micro_batch_size * max_response_tokens // chunk_size))


def token_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                chunk_size: int = 4096, num_chunks: int | None = None,
                collision: bool = False) -> torch.Tensor:
    """``log p(targets[i] | hidden[i])`` in float32: hidden [N, H], targets [N] → [N];
    with `collision`, [N, 2] whose second column is ``log Σ_v p(v | hidden[i])²`` (detached).

    The LM head runs on `chunk_size` rows at a time; under autograd each chunk is
    checkpointed (its logits are recomputed in backward) and the head is called as a module,
    so ZeRO-3's parameter gathering hooks fire in forward and in the recomputation alike.

    `num_chunks` fixes the number of head calls instead, whatever N is: ZeRO-3 gathers the
    head's parameters on every call, so ranks whose micro-batches hold different numbers of
    response tokens must still call it the same number of times, or their collectives stop
    matching and the group hangs. The N rows are split into `num_chunks` near-equal chunks
    (`chunk_size` is then unused); with fewer rows than chunks, zero rows pad the last
    chunks and their results are dropped.
    """
    n = hidden.shape[0]
    if num_chunks is None:
        bounds = [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    else:
        if n < num_chunks:
            pad = num_chunks - n
            hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])])
            targets = torch.cat([targets, targets.new_zeros(pad)])
        edges = [i * hidden.shape[0] // num_chunks for i in range(num_chunks + 1)]
        bounds = list(itertools.pairwise(edges))
    pieces = []
    for start, end in bounds:
        h, t = hidden[start:end], targets[start:end]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logps, lm_head, h, t, collision, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(lm_head, h, t, collision))
    if not pieces:
        return hidden.new_zeros((0, 2) if collision else (0,), dtype=torch.float32)
    return torch.cat(pieces)[:n]


def _model_mask(attention_mask: Any, dtype: torch.dtype) -> Any:
    """A 4-D bool block mask (True = attend) becomes the additive float mask every HF
    attention implementation that takes a 4-D mask understands (eager adds it, SDPA too).
    Anything else (2-D padding mask, None, a FlexAttention BlockMask) passes as is."""
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4
            and attention_mask.dtype == torch.bool):
        return attention_mask
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(attention_mask, zero, torch.finfo(dtype).min)


def response_token_logps(model: torch.nn.Module, input_ids: torch.Tensor,
                         attention_mask: Any, response_mask: torch.Tensor,
                         position_ids: torch.Tensor | None = None, chunk_size: int = 4096,
                         predict_index: torch.Tensor | None = None,
                         targets: torch.Tensor | None = None,
                         num_chunks: int | None = None,
                         collision: bool = False) -> torch.Tensor:
    """Log-probs of every response token: shape [N_response], float32 ([N_response, 2] with
    `collision`, see `token_logps`).

    Without `predict_index` the order is row-major over `response_mask`; with it (and
    `targets`), the order of `predict_index`. `num_chunks`: see `token_logps`."""
    backbone = getattr(model, model.base_model_prefix)
    mask = _model_mask(attention_mask, model.get_input_embeddings().weight.dtype)
    # no KV cache: with one, transformers would not detect packed sequences from position ids
    hidden = backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    if predict_index is None:
        targets = input_ids[:, 1:][response_mask[:, :-1]]
        selected = hidden[:, :-1][response_mask[:, :-1]]
    else:
        selected = hidden.flatten(0, 1)[predict_index]
    return token_logps(model.get_output_embeddings(), selected, targets, chunk_size,
                       num_chunks, collision)


def sequence_logps(model: torch.nn.Module, batch: PairBatch, chunk_size: int = 4096,
                   attention_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts per sequence: ([2B] float32, [2B] long).
    `attention_mask` overrides the batch's (e.g. a FlexAttention BlockMask)."""
    mask = batch.attention_mask if attention_mask is None else attention_mask
    token_logps = response_token_logps(model, batch.input_ids, mask, batch.response_mask,
                                       batch.position_ids, chunk_size, batch.predict_index,
                                       batch.targets)
    sums = torch.stack([t.sum() for t in batch.per_sequence(token_logps)])
    return sums, batch.counts


class ResponseLogps(torch.nn.Module):
    """Wraps a causal LM so that forward returns response-token log-probs.

    DeepSpeed wraps this module (not the bare LM), so its engine's forward/backward
    bookkeeping sees the whole log-prob computation. The LM stays at ``.lm``. Packed and
    unpacked batches take the same call: ``attention_mask`` is the 2-D padding mask, a
    4-D block mask, a FlexAttention BlockMask, or None with per-sequence ``position_ids``.

    `head_calls` fixes how many times forward calls the LM head (see `token_logps`): the
    trainer sets it so that every rank issues the same ZeRO-3 gathers whatever its batch.
    """

    def __init__(self, lm: torch.nn.Module, chunk_size: int = 4096, head_calls: int | None = None):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        self.head_calls = head_calls

    def forward(self, input_ids: torch.Tensor, attention_mask: Any,
                response_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                predict_index: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, collision: bool = False) -> torch.Tensor:
        return response_token_logps(self.lm, input_ids, attention_mask, response_mask,
                                    position_ids, self.chunk_size, predict_index, targets,
                                    self.head_calls, collision)
