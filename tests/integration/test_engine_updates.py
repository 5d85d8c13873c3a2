"""New weights into a running vLLM engine, in place: its log-probs must then equal a fresh
engine's on the new weights and a HF float32 forward's.

The toy model ties its LM head to its embeddings (as Qwen2/2.5 up to 3B do), and every
parameter of the new checkpoint differs from the old, the embeddings included: vLLM's own
`reload_weights` alone leaves the CPU engine's packed LM head stale (off by 0.23 nats per
token here), which a test that reloads the same weights, or leaves the embeddings alone,
cannot see (../shared/STACK-NOTES.md, "Weight updates").
"""

from __future__ import annotations

import pytest
import torch

from tests.integration.hf_logps import changed_copy

pytestmark = pytest.mark.integration

PROMPTS = [[1, 270, 201, 357], [1, 312, 361, 40, 41], [1, 42]]
RESPONSES = [[43, 44, 45, 46], [47, 48], [49, 50, 51, 52, 53, 54]]


def hf_logprobs(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt, response in zip(PROMPTS, RESPONSES):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        tok = logp.gather(-1, ids[0, 1:, None])[:, 0]
        out.append(tok[len(prompt) - 1:].tolist())
    return out


def gap(a, b):
    return max(abs(x - y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True))


def test_updated_engine_equals_a_fresh_engine_and_hf(ray_cluster, toy_world, tmp_path):
    import ray

    from workers.vllm_pool import Engine

    old_dir, new_dir = str(toy_world.model_dir), str(tmp_path / "new")
    old, new = changed_copy(old_dir, new_dir)
    assert set(old) == set(new) and all(not torch.equal(old[k], new[k]) for k in old)
    config = {"dtype": "float32", "max_model_len": 128, "enforce_eager": True}
    engine_actor = ray.remote(Engine).options(num_cpus=0)
    running = engine_actor.remote(old_dir, config)
    before = ray.get(running.sequence_logprobs.remote(PROMPTS, RESPONSES))
    info = ray.get(running.update_weights.remote(new_dir, 1))
    after = ray.get(running.sequence_logprobs.remote(PROMPTS, RESPONSES))
    served = ray.get(running.__ray_call__.remote(lambda self: self.version))
    ray.kill(running)
    fresh_actor = engine_actor.remote(new_dir, config)
    fresh = ray.get(fresh_actor.sequence_logprobs.remote(PROMPTS, RESPONSES))
    ray.kill(fresh_actor)
    hf = hf_logprobs(new_dir)
    print(f"update: {info}; gaps: before-vs-hf {gap(before, hf):.3g}, updated-vs-fresh"
          f" {gap(after, fresh):.3g}, updated-vs-hf {gap(after, hf):.3g}")
    assert served == info["version"] == 1
    assert info["bytes"] > 0 and info["seconds"] > 0
    assert gap(before, hf) > 1e-2  # the new weights do change the log-probs
    assert gap(after, fresh) < 1e-5
    assert gap(after, hf) < 1e-4
