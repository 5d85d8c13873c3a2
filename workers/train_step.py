"""One preference-optimisation micro-step, independent of Ray: rows in, loss out.

This is the code the Ray Train workers run (wrapped by DeepSpeed) and the code `bench/`
times on a GPU without Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workers.logprobs import PairBatch, collate_pairs
from workers.losses import LossOutput, PairLogps, compute_loss, loss_needs
from workers.losses.core import log_ratios
from workers.packing import PackedAttention, model_attention_mask, pack_pairs

# Dataset column → PairLogps field, for the per-pair values the trainer does not compute.
DATASET_FIELDS = {
    "ref_chosen_logp": "ref_chosen", "ref_rejected_logp": "ref_rejected",
    "ref_chosen_prefix_logp": "ref_chosen_prefix", "ref_rejected_prefix_logp": "ref_rejected_prefix",
    "chosen_score": "chosen_score", "rejected_score": "rejected_score",
    "chosen_winrate": "chosen_winrate", "rejected_winrate": "rejected_winrate",
}


# Columns the reference stage adds for losses that need mismatched completions (kto): pair
# i's prompt with the chosen/rejected response of another pair, and their reference log-probs.
KL_ID_COLUMNS = ("kl_chosen_ids", "kl_rejected_ids")
KL_REF_COLUMNS = ("ref_kl_chosen_logp", "ref_kl_rejected_logp")


@dataclass
class PairRows:
    """A micro-batch of prepared pairs: token tensors plus the dataset's per-pair values,
    keyed by PairLogps field name (absent or NaN columns are left out); `kl` holds the
    mismatched completions (same prompts, another pair's responses) and `kl_ref` their
    reference log-probs [2B], when the data has them."""

    batch: PairBatch
    given: dict[str, torch.Tensor]
    kl: PairBatch | None = None
    kl_ref: torch.Tensor | None = None


@dataclass
class RunningMean:
    """A running mean of the batch rewards β·[a; b] over every rank's micro-batches, weighted
    by their sizes (TRL's RunningMoments mean, which BCO subtracts as δ); saved in checkpoints."""

    mean: float = 0.0
    count: float = 0.0

    def update(self, rewards: torch.Tensor) -> torch.Tensor:
        """Fold in this micro-batch (summed across ranks) and return the new mean; a
        non-finite batch leaves it as it was (that batch is skipped by the NaN guard)."""
        import torch.distributed as dist

        total = torch.stack([rewards.detach().double().sum(),
                             torch.tensor(float(rewards.numel()), dtype=torch.float64,
                                          device=rewards.device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        s, n = total.tolist()
        if math.isfinite(s):
            self.count += n
            self.mean += (s / n - self.mean) * n / self.count
        return torch.tensor(self.mean, dtype=torch.float32, device=rewards.device)


def gather_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` from every rank concatenated (equal shapes on every rank), or `t` alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


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

    def layout(prompts, chosen, rejected) -> PairBatch:
        return (collate_pairs(prompts, chosen, rejected, pad_id) if packing is None
                else pack_pairs(prompts, chosen, rejected, pad_id, attention=packing,
                                row_tokens=row_tokens, share_prompt=share_prompt))

    given = {field: _column(rows, col) for col, field in DATASET_FIELDS.items()}
    pairs = PairRows(batch=layout(*columns), given={k: v for k, v in given.items() if v is not None})
    if all(c in rows for c in KL_ID_COLUMNS + KL_REF_COLUMNS):
        pairs.kl = layout(rows["prompt_ids"], *(rows[c] for c in KL_ID_COLUMNS))
        pairs.kl_ref = torch.cat([_column(rows, c) for c in KL_REF_COLUMNS])
    return pairs


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


def _forward(module: torch.nn.Module, batch: PairBatch, collision: bool = False) -> torch.Tensor:
    """Response-token log-probs in sequence order ([N], or [N, 2] with `collision`)."""
    out = module(batch.input_ids, model_attention_mask(batch), batch.response_mask,
                 batch.position_ids, batch.predict_index, batch.targets, collision=collision)
    return out if batch.order is None else out[batch.order]


def policy_pair_logps(module: torch.nn.Module, pairs: PairRows,
                      needs: frozenset[str] = frozenset()) -> PairLogps:
    """One forward over the pairs' sequences (padded or packed); sums and shared-prefix sums
    of response log-probs, plus what the loss's `needs` ask of the policy: WPO's per-token
    statistics from the same forward ("token_stats"), and the log-probs of the mismatched
    completions, under no_grad, gathered across ranks ("kl_pairs").

    `module` is a `workers.logprobs.ResponseLogps` or the DeepSpeed engine wrapping one.
    """
    kl = None
    if "kl_pairs" in needs:
        if pairs.kl is None:
            raise ValueError(f"the loss needs mismatched completions: columns {KL_ID_COLUMNS}"
                             f" and {KL_REF_COLUMNS}, which the reference stage adds")
        with torch.no_grad():  # z0 carries no gradient (TRL computes it the same way)
            kl_logps = _forward(module, pairs.kl)
            kl = sequence_sums(kl_logps, pairs.kl.counts.to(kl_logps.device))
    batch = pairs.batch
    stats = "token_stats" in needs
    token_logps = _forward(module, batch, collision=stats)
    log_sq = None
    if stats:
        token_logps, log_sq = token_logps.unbind(-1)
    counts = batch.counts.to(token_logps.device)
    n = batch.num_pairs
    lengths = counts.to(torch.float32)
    sums = sequence_sums(token_logps, counts)
    prefix_sums = sequence_sums(token_logps, counts,
                                torch.minimum(counts[:n], counts[n:]).repeat(2))
    given = {k: v.to(token_logps.device) for k, v in pairs.given.items()}
    if log_sq is not None:  # WPO: (1/|y|)·Σ_t [log p_t(y_t) − log Σ_v p_t(v)²], no gradient
        logw = sequence_sums(token_logps.detach() - log_sq, counts) / lengths.clamp(min=1.0)
        given.update(chosen_wpo_logw=logw[:n], rejected_wpo_logw=logw[n:])
    if kl is not None:
        given.update(kl_policy=gather_ranks(kl), kl_ref=gather_ranks(pairs.kl_ref.to(kl.device)))
    return PairLogps(
        policy_chosen=sums[:n], policy_rejected=sums[n:],
        chosen_len=lengths[:n], rejected_len=lengths[n:],
        policy_chosen_prefix=prefix_sums[:n], policy_rejected_prefix=prefix_sums[n:],
        **given,
    )


def pair_loss(module: torch.nn.Module, pairs: PairRows, loss_name: str,
              loss_params: Mapping[str, Any], running: RunningMean | None = None
              ) -> tuple[torch.Tensor, LossOutput]:
    """The scalar loss to backpropagate and the full LossOutput (metrics, rewards).
    `running`: the run's RunningMean, which a loss that needs running statistics (bco)
    updates with this micro-batch and reads as its shift."""
    needs = loss_needs(loss_name, loss_params)
    logps = policy_pair_logps(module, pairs, needs)
    if "running_stats" in needs:
        if running is None:
            raise ValueError(f"loss {loss_name!r} needs running statistics: pass running="
                             "RunningMean() and keep it across steps")
        a, b = log_ratios(logps)
        logps.bco_delta = running.update(loss_params["beta"] * torch.cat([a, b]))
    out = compute_loss(loss_name, logps, **loss_params)
    return out.mean(), out
