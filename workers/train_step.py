"""One preference-optimisation micro-step, independent of Ray: rows in, loss out.

This is the code the Ray Train workers run (wrapped by DeepSpeed) and the code `bench/`
times on a GPU without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from workers.logprobs import PairBatch, collate_pairs
from workers.losses import LossOutput, PairLogps, compute_loss


@dataclass
class PairRows:
    """A micro-batch of prepared pairs as the training dataset holds them."""

    batch: PairBatch
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    ref_chosen_prefix: torch.Tensor | None
    ref_rejected_prefix: torch.Tensor | None
    chosen_score: torch.Tensor | None
    rejected_score: torch.Tensor | None


def _column(rows: Mapping[str, Any], name: str) -> torch.Tensor | None:
    if name not in rows:
        return None
    values = np.asarray(rows[name], dtype=np.float64)
    if np.isnan(values).any():
        return None
    return torch.as_tensor(values, dtype=torch.float32)


def rows_to_pairs(rows: Mapping[str, Any], pad_id: int) -> PairRows:
    """Build tensors from a dict of columns (numpy batch from Ray Data, or plain lists)."""
    batch = collate_pairs(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], pad_id)
    return PairRows(
        batch=batch,
        ref_chosen=_column(rows, "ref_chosen_logp"),
        ref_rejected=_column(rows, "ref_rejected_logp"),
        ref_chosen_prefix=_column(rows, "ref_chosen_prefix_logp"),
        ref_rejected_prefix=_column(rows, "ref_rejected_prefix_logp"),
        chosen_score=_column(rows, "chosen_score"),
        rejected_score=_column(rows, "rejected_score"),
    )


def policy_pair_logps(module: torch.nn.Module, pairs: PairRows) -> PairLogps:
    """One forward over [chosen; rejected]; sums and shared-prefix sums of response log-probs.

    `module` is a `workers.logprobs.ResponseLogps` or the DeepSpeed engine wrapping one.
    """
    batch = pairs.batch
    token_logps = module(batch.input_ids, batch.attention_mask, batch.response_mask)
    counts = batch.response_mask[:, :-1].sum(dim=1)
    per_row = torch.split(token_logps, counts.tolist())
    n = batch.num_pairs
    lengths = counts.to(torch.float32)
    prefix = torch.minimum(counts[:n], counts[n:])
    sums = torch.stack([t.sum() for t in per_row])
    prefix_sums = torch.stack([per_row[i][: int(prefix[i % n])].sum() for i in range(2 * n)])
    return PairLogps(
        policy_chosen=sums[:n], policy_rejected=sums[n:],
        ref_chosen=pairs.ref_chosen, ref_rejected=pairs.ref_rejected,
        chosen_len=lengths[:n], rejected_len=lengths[n:],
        chosen_score=pairs.chosen_score, rejected_score=pairs.rejected_score,
        policy_chosen_prefix=prefix_sums[:n], policy_rejected_prefix=prefix_sums[n:],
        ref_chosen_prefix=pairs.ref_chosen_prefix, ref_rejected_prefix=pairs.ref_rejected_prefix,
    )


def pair_loss(module: torch.nn.Module, pairs: PairRows, loss_name: str,
              loss_params: Mapping[str, Any]) -> tuple[torch.Tensor, LossOutput]:
    """The scalar loss to backpropagate and the full LossOutput (metrics, rewards)."""
    logps = policy_pair_logps(module, pairs)
    out = compute_loss(loss_name, logps, **loss_params)
    return out.mean(), out
