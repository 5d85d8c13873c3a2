"""One preference-optimisation micro-step, independent of Ray: rows in, loss out.

This is the code the Ray Train workers run (wrapped by DeepSpeed) and the code `bench/`
times on a GPU without Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workers.logprobs import PairBatch, collate_pairs
from workers.losses import LossOutput, PairLogps, compute_loss
from workers.packing import PackedAttention, model_attention_mask, pack_pairs

# Dataset column → PairLogps field, for the per-pair values the trainer does not compute.
DATASET_FIELDS = {
    "ref_chosen_logp": "ref_chosen", "ref_rejected_logp": "ref_rejected",
    "ref_chosen_prefix_logp": "ref_chosen_prefix", "ref_rejected_prefix_logp": "ref_rejected_prefix",
    "chosen_score": "chosen_score", "rejected_score": "rejected_score",
    "chosen_winrate": "chosen_winrate", "rejected_winrate": "rejected_winrate",
}


@dataclass
class PairRows:
    """A micro-batch of prepared pairs: token tensors plus the dataset's per-pair values,
    keyed by PairLogps field name (absent or NaN columns are left out)."""

    batch: PairBatch
    given: dict[str, torch.Tensor]


def _column(rows: Mapping[str, Any], name: str) -> torch.Tensor | None:
    if name not in rows:
        return None
    values = np.asarray(rows[name], dtype=np.float64)
    if np.isnan(values).any():
        return None
    return torch.as_tensor(values, dtype=torch.float32)


def rows_to_pairs(rows: Mapping[str, Any], pad_id: int,
                  packing: PackedAttention | None = None, share_prompt: bool = False,
                  row_tokens: int | None = None) -> PairRows:
    """Build tensors from a dict of columns (numpy batch from Ray Data, or plain lists);
    `packing` packs the pairs' sequences into shared rows of up to `row_tokens`, and
    `share_prompt` computes each prompt once (see `workers.packing`)."""
    columns = (rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"])
    if share_prompt and packing is None:
        raise ValueError("share_prompt needs packing ('mask' or 'flex')")
    batch = (collate_pairs(*columns, pad_id) if packing is None
             else pack_pairs(*columns, pad_id, attention=packing, row_tokens=row_tokens,
                             share_prompt=share_prompt))
    given = {field: _column(rows, col) for col, field in DATASET_FIELDS.items()}
    return PairRows(batch=batch, given={k: v for k, v in given.items() if v is not None})


def sequence_sums(token_logps: torch.Tensor, counts: torch.Tensor,
                  limit: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence sums of token log-probs in sequence order ([N] → [S]), over each
    sequence's first `limit[s]` tokens when given; no host synchronisation."""
    seq = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts,
                                  output_size=token_logps.shape[0])
    if limit is not None:
        rank = torch.arange(seq.numel(), device=seq.device) - (counts.cumsum(0) - counts)[seq]
        token_logps = token_logps * (rank < limit[seq])
    return token_logps.new_zeros(counts.numel()).index_add(0, seq, token_logps)


def policy_pair_logps(module: torch.nn.Module, pairs: PairRows) -> PairLogps:
    """One forward over the pairs' sequences (padded or packed); sums and shared-prefix sums
    of response log-probs.

    `module` is a `workers.logprobs.ResponseLogps` or the DeepSpeed engine wrapping one.
    """
    batch = pairs.batch
    token_logps = module(batch.input_ids, model_attention_mask(batch), batch.response_mask,
                         batch.position_ids, batch.predict_index, batch.targets)
    if batch.order is not None:
        token_logps = token_logps[batch.order]
    counts = batch.counts.to(token_logps.device)
    n = batch.num_pairs
    lengths = counts.to(torch.float32)
    sums = sequence_sums(token_logps, counts)
    prefix_sums = sequence_sums(token_logps, counts,
                                torch.minimum(counts[:n], counts[n:]).repeat(2))
    given = {k: v.to(token_logps.device) for k, v in pairs.given.items()}
    return PairLogps(
        policy_chosen=sums[:n], policy_rejected=sums[n:],
        chosen_len=lengths[:n], rejected_len=lengths[n:],
        policy_chosen_prefix=prefix_sums[:n], policy_rejected_prefix=prefix_sums[n:],
        **given,
    )


def pair_loss(module: torch.nn.Module, pairs: PairRows, loss_name: str,
              loss_params: Mapping[str, Any]) -> tuple[torch.Tensor, LossOutput]:
    """The scalar loss to backpropagate and the full LossOutput (metrics, rewards)."""
    logps = policy_pair_logps(module, pairs)
    out = compute_loss(loss_name, logps, **loss_params)
    return out.mean(), out
