"""Response log-probs: chunked, masked path == a naive full-vocabulary computation."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from workers.logprobs import ResponseLogps, collate_pairs, sequence_logps, token_logps
from workers.train_step import pair_loss, policy_pair_logps, rows_to_pairs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).eval()


def naive(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    tok = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return tok[len(prompt) - 1:].sum().item()


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
CHOSEN = [[20, 21], [22, 23, 24, 25], [26]]
REJECTED = [[30, 31, 32, 33, 34, 35], [36], [37, 38]]


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_sequence_logps_match_naive(model, chunk):
    batch = collate_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0)
    assert batch.input_ids.shape == (6, 9)
    with torch.no_grad():
        sums, counts = sequence_logps(model, batch, chunk_size=chunk)
    expected = [naive(model, p, r) for p, r in zip(PROMPTS * 2, CHOSEN + REJECTED)]
    assert counts.tolist() == [len(r) for r in CHOSEN + REJECTED]
    assert torch.allclose(sums.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)


def test_chunked_backward_matches_unchunked(model):
    batch = collate_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0)
    grads = []
    for chunk in (2, 4096):
        model.zero_grad()
        token_logps = ResponseLogps(model, chunk)(batch.input_ids, batch.attention_mask,
                                                   batch.response_mask)
        token_logps.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_pair_loss_runs_and_counts(model):
    rows = {"prompt_ids": PROMPTS, "chosen_ids": CHOSEN, "rejected_ids": REJECTED,
            "ref_chosen_logp": [-10.0, -12.0, -5.0], "ref_rejected_logp": [-20.0, -6.0, -9.0],
            "chosen_score": [1.0, 0.8, 0.6], "rejected_score": [0.2, 0.1, 0.5]}
    pairs = rows_to_pairs(rows, pad_id=0)
    module = ResponseLogps(model)
    logps = policy_pair_logps(module, pairs)
    assert logps.chosen_len.tolist() == [2, 4, 1] and logps.rejected_len.tolist() == [6, 1, 2]
    # shared prefix: first min(|yw|, |yl|) tokens of each response
    with torch.no_grad():
        first = naive(model, PROMPTS[0], CHOSEN[0][:2])
    assert abs(logps.policy_chosen_prefix[0].item() - first) < 1e-4
    loss, out = pair_loss(module, pairs, "sigmoid", {"beta": 0.1})
    loss.backward()
    assert torch.isfinite(loss) and "rewards/margins" in out.metrics


def test_dataset_columns_reach_the_loss(model):
    """Sampled-round columns (win rates) flow into PairLogps, so `sppo` trains on them."""
    rows = {"prompt_ids": PROMPTS, "chosen_ids": CHOSEN, "rejected_ids": REJECTED,
            "ref_chosen_logp": [-10.0, -12.0, -5.0], "ref_rejected_logp": [-20.0, -6.0, -9.0],
            "chosen_winrate": [1.0, 0.75, 0.5], "rejected_winrate": [0.0, 0.25, 0.5],
            "chosen_score": [float("nan")] * 3, "rejected_score": [float("nan")] * 3}
    pairs = rows_to_pairs(rows, pad_id=0)
    assert set(pairs.given) == {"ref_chosen", "ref_rejected", "chosen_winrate", "rejected_winrate"}
    logps = policy_pair_logps(ResponseLogps(model), pairs)
    assert logps.chosen_winrate.tolist() == [1.0, 0.75, 0.5] and logps.chosen_score is None
    loss, _ = pair_loss(ResponseLogps(model), pairs, "sppo", {"beta": 0.1})
    assert torch.isfinite(loss)


def naive_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor):
    """Full-vocabulary float32 log_softmax of the whole batch, then gather."""
    return torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets[:, None])[:, 0]


def values_and_grads(fn, head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                     upstream: torch.Tensor):
    head.zero_grad()
    h = hidden.detach().clone().requires_grad_(True)
    out = fn(head, h, targets)
    (out * upstream).sum().backward()  # per-token upstream gradients differ, as a DPO loss's do
    return out.detach(), h.grad, head.weight.grad.clone()


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-6, 1e-5),
                                               (torch.bfloat16, 1e-2, 1.6e-2)])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_token_logps_values_and_gradients_match_naive(dtype, atol, rtol, chunk):
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False).to(dtype)
    hidden = torch.randn(13, 16, dtype=dtype)
    targets = torch.randint(0, 50, (13,))
    upstream = torch.randn(13)
    got = values_and_grads(lambda m, h, t: token_logps(m, h, t, chunk), head, hidden, targets,
                           upstream)
    want = values_and_grads(naive_token_logps, head, hidden, targets, upstream)
    assert got[0].dtype == torch.float32
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def test_token_logps_gradient_is_not_trivially_equal():
    """The comparison above can fail: a log-prob that ignores the normaliser differs."""
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden, targets, upstream = torch.randn(13, 16), torch.randint(0, 50, (13,)), torch.randn(13)
    want = values_and_grads(naive_token_logps, head, hidden, targets, upstream)
    wrong = values_and_grads(lambda m, h, t: m(h).gather(-1, t[:, None])[:, 0], head, hidden,
                             targets, upstream)
    assert (wrong[1] - want[1]).abs().max() > 1e-3


@pytest.mark.parametrize("grad", [False, True])
def test_lm_head_sees_response_positions_only_in_chunks(model, grad):
    """Full-vocabulary logits exist for at most `chunk` rows at a time, and only for
    positions that predict a response token (never for prompt or padding positions)."""
    batch = collate_pairs(PROMPTS, CHOSEN, REJECTED, pad_id=0)
    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    try:
        with torch.set_grad_enabled(grad):
            out = ResponseLogps(model, chunk_size=4)(batch.input_ids, batch.attention_mask,
                                                     batch.response_mask)
            if grad:
                out.sum().backward()
    finally:
        hook.remove()
    n_response = sum(len(r) for r in CHOSEN + REJECTED)
    assert max(rows) <= 4
    assert sum(rows) == n_response * (2 if grad else 1)  # recomputed once in backward


def _head_calls(model, batch, head_calls, grad=True):
    """(LM-head calls in forward + backward, token log-probs) of one ResponseLogps pass."""
    calls: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    try:
        model.zero_grad()
        out = ResponseLogps(model, chunk_size=4, head_calls=head_calls)(
            batch.input_ids, batch.attention_mask, batch.response_mask)
        if grad:
            out.sum().backward()
    finally:
        hook.remove()
    return calls, out.detach()


@pytest.mark.parametrize("n_pairs", [1, 2, 3])
def test_head_calls_do_not_depend_on_the_batch(model, n_pairs):
    """ZeRO-3 gathers the head's weights on every call: ranks whose batches hold 3 or 21
    response tokens must call it equally often (in forward and in the recomputation), or
    their collectives stop matching. With head_calls fixed the count is the same for every
    batch and the values equal the unchunked ones."""
    batch = collate_pairs(PROMPTS[:n_pairs], CHOSEN[:n_pairs], REJECTED[:n_pairs], pad_id=0)
    n_response = int(batch.counts.sum())
    calls, fixed = _head_calls(model, batch, head_calls=5)
    fixed_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert len(calls) == 2 * 5  # 5 in forward, 5 recomputed in backward
    assert sum(calls) == 2 * max(n_response, 5)  # padding rows only where N < calls
    plain_calls, plain = _head_calls(model, batch, head_calls=None)
    plain_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert len(plain_calls) == 2 * -(-n_response // 4)  # the chunk_size path: depends on N
    assert fixed.shape == (n_response,)
    assert torch.allclose(fixed, plain, atol=1e-6)
    assert torch.allclose(fixed_grads, plain_grads, atol=1e-6)


def test_head_calls_cover_the_largest_batch():
    from workers.logprobs import head_calls

    assert head_calls(max_response_tokens=256, micro_batch_size=4, chunk_size=1024) == 2
    assert head_calls(max_response_tokens=256, micro_batch_size=4, chunk_size=8192) == 1
    assert head_calls(max_response_tokens=100, micro_batch_size=3, chunk_size=7) == 86
