"""The float32 HF forward the integration tests compare vLLM's log-probs with."""

from __future__ import annotations

import shutil

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


def changed_copy(src, dst, seed=0):
    """`src` with every weight moved by 5% of its spread (safetensors, tokenizer kept):
    (old weights, new weights)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(f"{src}/model.safetensors")
    g = torch.Generator().manual_seed(seed)
    new = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) for k, v in weights.items()}
    save_file(new, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return weights, new
