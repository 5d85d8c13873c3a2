"""The float32 HF forward the integration tests compare vLLM's log-probs with."""

from __future__ import annotations

import torch

# Documented tolerance for vLLM (fp32, CPU) vs a float32 HF forward, per summed sequence.
# Measured gap on the toy model is ~1e-6; 1e-3 leaves room for kernel differences.
REF_TOLERANCE = 1e-3


def hf_response_logps(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """Summed log-prob of the response given the prompt: a float32 HF forward."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return logp.gather(-1, ids[0, 1:, None])[len(prompt_ids) - 1:, 0].sum().item()
