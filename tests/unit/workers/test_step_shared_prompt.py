"""Shared prompt: prompt once, chosen and rejected continuations masked apart, same log-probs."""

from __future__ import annotations

import pytest
import torch

from tests.unit.tiny_models import tiny_qwen2
from workers.logprobs import ResponseLogps, collate_pairs, response_token_logps
from workers.packing import CHOSEN, PROMPT, REJECTED, block_causal_mask, pack_pairs
from workers.train_step import pair_loss, rows_to_pairs, sequence_sums

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15], [16, 17, 18, 19]]
CHOSEN_IDS = [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29, 30, 31, 32, 33], [34, 35]]
REJECTED_IDS = [[40, 41, 42, 43, 44, 45], [46], [47, 48], [49, 50], [51, 52, 53]]
ROWS = {"prompt_ids": PROMPTS, "chosen_ids": CHOSEN_IDS, "rejected_ids": REJECTED_IDS,
        "ref_chosen_logp": [-10.0, -12.0, -5.0, -9.0, -7.0],
        "ref_rejected_logp": [-20.0, -6.0, -9.0, -8.0, -11.0],
        "ref_chosen_prefix_logp": [-8.0, -3.0, -5.0, -4.0, -7.0],
        "ref_rejected_prefix_logp": [-9.0, -6.0, -3.0, -5.0, -8.0],
        "chosen_score": [1.0, 0.8, 0.6, 0.9, 0.7], "rejected_score": [0.2, 0.1, 0.5, 0.3, 0.4]}


def per_token(model, batch) -> torch.Tensor:
    """Response-token log-probs in sequence order (chosen 0..B-1, then rejected)."""
    with torch.no_grad():
        out = response_token_logps(model, batch.input_ids, batch.attention_mask,
                                   batch.response_mask, batch.position_ids, 3,
                                   batch.predict_index, batch.targets)
    return torch.cat(batch.per_sequence(out))


def test_layout_prompt_once_rejected_positions_restart():
    batch = pack_pairs(PROMPTS, CHOSEN_IDS, REJECTED_IDS, pad_id=0, share_prompt=True)
    assert batch.real_tokens == sum(len(p) + len(c) + len(r)
                                    for p, c, r in zip(PROMPTS, CHOSEN_IDS, REJECTED_IDS))
    r, = torch.nonzero((batch.sequence_ids == 0).any(dim=1))[0].tolist()
    cols = (batch.sequence_ids[r] == 0).nonzero()[:, 0]
    assert batch.input_ids[r, cols].tolist() == PROMPTS[0] + CHOSEN_IDS[0] + REJECTED_IDS[0]
    assert batch.branch_ids[r, cols].tolist() == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 6
    assert batch.position_ids[r, cols].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 8]
    # the prompt's last position predicts the first token of both responses
    last_prompt = r * batch.input_ids.shape[1] + int(cols[2])
    n = len(PROMPTS)
    first = torch.cumsum(batch.counts, 0) - batch.counts
    assert batch.predict_index[first[0]] == last_prompt == batch.predict_index[first[n]]
    with pytest.raises(ValueError, match="explicit mask"):
        pack_pairs(PROMPTS, CHOSEN_IDS, REJECTED_IDS, pad_id=0, attention="position_ids",
                   share_prompt=True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("row_tokens", [None, 64])
def test_shared_prompt_token_logps_match_unshared(attn, row_tokens):
    model = tiny_qwen2(attn)
    want = per_token(model, collate_pairs(PROMPTS, CHOSEN_IDS, REJECTED_IDS, pad_id=0))
    shared = pack_pairs(PROMPTS, CHOSEN_IDS, REJECTED_IDS, pad_id=0, row_tokens=row_tokens,
                        share_prompt=True)
    got = per_token(model, shared)
    assert got.shape == want.shape == (sum(map(len, CHOSEN_IDS + REJECTED_IDS)),)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rejected_seeing_chosen_would_differ():
    """The check above can fail: without the branch mask, rejected attends to chosen."""
    model = tiny_qwen2("sdpa")
    want = per_token(model, collate_pairs(PROMPTS, CHOSEN_IDS, REJECTED_IDS, pad_id=0))
    shared = pack_pairs(PROMPTS, CHOSEN_IDS, REJECTED_IDS, pad_id=0, share_prompt=True)
    shared.attention_mask = block_causal_mask(shared.sequence_ids)  # branches ignored
    assert (per_token(model, shared) - want).abs().max() > 1e-3


def test_shared_prompt_loss_and_gradients_match_padded():
    model = tiny_qwen2("sdpa")
    module = ResponseLogps(model, chunk_size=4)
    results = []
    for packing, share in ((None, False), ("mask", True)):
        model.zero_grad()
        loss, out = pair_loss(module, rows_to_pairs(ROWS, pad_id=0, packing=packing,
                                                    share_prompt=share),
                              "ld_dpo", {"beta": 0.1, "ld_alpha": 0.5})
        loss.backward()
        results.append((loss.detach(), out.metrics,
                        torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss_a, metrics_a, grad_a), (loss_b, metrics_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-5)
    for k in metrics_a:
        assert metrics_b[k] == pytest.approx(metrics_a[k], abs=1e-5, rel=1e-4), k
    torch.testing.assert_close(grad_b, grad_a, atol=1e-6, rtol=1e-4)


def test_sequence_sums_and_prefix_sums():
    logps = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 100.0])
    counts = torch.tensor([3, 2, 1])
    assert sequence_sums(logps, counts).tolist() == [6.0, 30.0, 100.0]
    assert sequence_sums(logps, counts, torch.tensor([2, 1, 0])).tolist() == [3.0, 10.0, 0.0]
