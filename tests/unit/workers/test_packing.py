"""Pair-aware packing: packed rows give the same log-probs and gradients as padded rows."""

from __future__ import annotations

import pytest
import torch

from tests.unit.tiny_models import tiny_qwen2
from workers.logprobs import ResponseLogps, collate_pairs, sequence_logps
from workers.packing import (
    attention_mode,
    block_causal_mask,
    first_fit_decreasing,
    model_attention_mask,
    pack_pairs,
)
from workers.train_step import pair_loss, rows_to_pairs

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15], [16, 17, 18, 19]]
CHOSEN = [[20, 21], [22, 23, 24, 25], [26], [27, 28, 29, 30, 31, 32, 33], [34, 35]]
REJECTED = [[40, 41, 42, 43, 44, 45], [46], [47, 48], [49, 50], [51, 52, 53]]


def test_first_fit_decreasing_fills_rows():
    assert first_fit_decreasing([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    with pytest.raises(ValueError, match="over the row budget"):
        first_fit_decreasing([9], 8)


def test_layout_positions_and_mask():
    batch = pack_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0, row_tokens=40)
    assert batch.input_ids.shape[0] < 2 * len(PROMPTS)
    assert batch.real_tokens == sum(2 * len(p) + len(c) + len(r)
                                    for p, c, r in zip(PROMPTS, CHOSEN, REJECTED))
    assert batch.counts.tolist() == [len(r) for r in CHOSEN + REJECTED]
    # every sequence starts at position 0 and its tokens are contiguous
    starts = (batch.position_ids == 0).sum().item()
    pads = (batch.input_ids.numel() - batch.real_tokens) > 0
    assert starts >= 2 * len(PROMPTS) + (1 if pads else 0)
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))[0, 0]
    assert mask[1].tolist() == [True, True, False, False, False, False]
    assert mask[4].tolist() == [False, False, True, True, True, False]
    assert mask[5].tolist() == [False] * 5 + [True]


@pytest.mark.parametrize("attn, mode", [("sdpa", "mask"), ("eager", "mask"),
                                        ("sdpa", "position_ids"), ("eager", "position_ids")])
@pytest.mark.parametrize("row_tokens", [None, 64])
def test_packed_logps_match_unpacked(attn, mode, row_tokens):
    model = tiny_qwen2(attn)
    padded = collate_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0)
    packed = pack_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0, attention=mode, row_tokens=row_tokens)
    assert packed.padding_fraction < padded.padding_fraction
    with torch.no_grad():
        want, want_counts = sequence_logps(model, padded, chunk_size=3)
        got, got_counts = sequence_logps(model, packed, chunk_size=3)
    assert got_counts.tolist() == want_counts.tolist()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unmasked_packing_would_differ():
    """The check above can fail: packing without confining attention changes the answer."""
    model = tiny_qwen2("sdpa")
    packed = pack_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0, row_tokens=64)
    packed.attention_mask, packed.position_ids = None, None  # plain causal over the whole row
    with torch.no_grad():
        want, _ = sequence_logps(model, collate_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0))
        got, _ = sequence_logps(model, packed)
    assert (got - want).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["mask", "position_ids"])
def test_packed_loss_and_gradients_match_unpacked(mode):
    model = tiny_qwen2("sdpa")
    module = ResponseLogps(model, chunk_size=4)
    rows = {"prompt_ids": PROMPTS, "chosen_ids": CHOSEN, "rejected_ids": REJECTED,
            "ref_chosen_logp": [-10.0, -12.0, -5.0, -9.0, -7.0],
            "ref_rejected_logp": [-20.0, -6.0, -9.0, -8.0, -11.0],
            "chosen_score": [1.0, 0.8, 0.6, 0.9, 0.7], "rejected_score": [0.2, 0.1, 0.5, 0.3, 0.4]}
    results = []
    for packing in (None, mode):
        model.zero_grad()
        loss, out = pair_loss(module, rows_to_pairs(rows, pad_id=0, packing=packing),
                              "principled", {"beta": 0.1, "target": "scores"})
        loss.backward()
        results.append((loss.detach(), out.metrics,
                        torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss_a, metrics_a, grad_a), (loss_b, metrics_b, grad_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-5)
    assert metrics_a.keys() == metrics_b.keys()
    for k in metrics_a:
        assert metrics_b[k] == pytest.approx(metrics_a[k], abs=1e-5, rel=1e-4), k
    torch.testing.assert_close(grad_b, grad_a, atol=1e-6, rtol=1e-4)


@pytest.fixture
def eager_flex(monkeypatch):
    """transformers compiles flex_attention on first use; on CPU, torch 2.13's inductor fails
    to compile that kernel (CppCompileError in the generated flex template), so CPU tests
    run torch's eager flex_attention on the same BlockMask and mask_mod instead. The
    compiled kernel's agreement is checked on GPU by bench/bench_step.py at startup."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    def eager(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager)


def test_attention_mode_follows_the_attention_implementation():
    assert [attention_mode(tiny_qwen2(a)) for a in ("eager", "sdpa", "flex_attention")] == [
        "mask", "mask", "flex"]


def test_flex_batches_pack_into_one_unpadded_row():
    batch = pack_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0, attention="flex")
    assert batch.input_ids.shape[0] == 1 and batch.padding_fraction == 0.0
    assert batch.flex and batch.attention_mask is None


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("row_tokens", [None, 64])
def test_flex_logps_match_mask_and_unpacked(eager_flex, row_tokens):
    """FlexAttention block mask == explicit 4-D mask == one sequence per row (fp32, forward:
    FlexAttention has no backward on CPU)."""
    reference, flex = tiny_qwen2("sdpa"), tiny_qwen2("flex_attention")
    packed = pack_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0, attention="flex",
                        row_tokens=row_tokens)
    masked = pack_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0, attention="mask",
                        row_tokens=row_tokens)
    with torch.no_grad():
        want, _ = sequence_logps(reference, collate_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0))
        got_mask, _ = sequence_logps(reference, masked)
        got_flex, _ = sequence_logps(flex, packed, attention_mask=model_attention_mask(packed))
    torch.testing.assert_close(got_mask, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_flex, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="FlexAttention has no backward on CPU (torch 2.13: 'FlexAttention "
                           "does not support backward on CPU'); runs where CUDA is present")
def test_flex_gradients_match_mask_on_cuda():
    model = tiny_qwen2("sdpa").cuda().train()
    module = ResponseLogps(model, chunk_size=4)
    rows = {"prompt_ids": PROMPTS, "chosen_ids": CHOSEN, "rejected_ids": REJECTED,
            "ref_chosen_logp": [-10.0] * 5, "ref_rejected_logp": [-11.0] * 5}
    grads = []
    for impl, packing in (("sdpa", "mask"), ("flex_attention", "flex")):
        model.set_attn_implementation(impl)
        model.zero_grad()
        pairs = rows_to_pairs(rows, pad_id=0, packing=packing)
        pairs.batch = pairs.batch.to("cuda")
        pair_loss(module, pairs, "sigmoid", {"beta": 0.1})[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
