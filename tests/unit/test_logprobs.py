"""Response log-probs: chunked, masked path == a naive full-vocabulary float64 computation."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from workers.logprobs import ResponseLogps, collate_pairs, sequence_logps
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
