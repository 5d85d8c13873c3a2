"""Study sampling: HF `generate` on held-out prompts, the evaluate stage's metrics (KL to the
reference, gold reward, win rate, length), and on-policy pairs for online rounds.

The pipeline samples with vLLM; on a model this small HF `generate` in-process is faster and
needs no engine start. Sampling is plain ancestral (temperature 1, no top-k/top-p), so a
sample's log-prob under the policy's fp32 forward is its sampling log-prob.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

import torch

from bench.study_data import Row
from bench.study_train import pair_logps
from pipeline.config import RoundsConfig
from pipeline.evalstats import sequence_kl, wins
from pipeline.pairs import build_pairs
from pipeline.toy.reward import toy_gold_rewards, toy_reward_parts


@dataclass(frozen=True)
class SampleSettings:
    k: int = 2                  # samples per prompt (even: samples are scored two per row)
    max_new_tokens: int = 48    # the demo's sampling.max_tokens
    temperature: float = 1.0


@dataclass
class Samples:
    """`k` samples per prompt, prompt-major: sample j of prompt i is at i*k + j."""

    prompt_text: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    response: list[str]


def _trim(ids: list[int], eos_id: int) -> list[int]:
    """Generated ids up to and including the first EOS (what vLLM returns as token_ids)."""
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


@torch.no_grad()
def generate(lm: torch.nn.Module, tokenizer: Any, prompts: Sequence[Row], s: SampleSettings,
             seed: int, batch_prompts: int = 64) -> Samples:
    """`s.k` ancestral samples for each prompt row ({prompt_text, prompt_ids})."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    lm.eval()
    out = Samples([], [], [], [])
    torch.manual_seed(seed)
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start:start + batch_prompts]
        width = max(len(p["prompt_ids"]) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding
            ids[i, width - len(p["prompt_ids"]):] = torch.tensor(p["prompt_ids"])
            mask[i, width - len(p["prompt_ids"]):] = 1
        gen = lm.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                          temperature=s.temperature, top_k=0, top_p=1.0,
                          max_new_tokens=s.max_new_tokens, num_return_sequences=s.k,
                          eos_token_id=eos, pad_token_id=pad)
        for row, new in enumerate(gen[:, width:].tolist()):
            p = chunk[row // s.k]
            response = _trim(new, eos)
            out.prompt_text.append(p["prompt_text"])
            out.prompt_ids.append(list(p["prompt_ids"]))
            out.response_ids.append(response)
            out.response.append(tokenizer.decode(response, skip_special_tokens=True))
    return out


def sample_logps(module: torch.nn.Module, samples: Samples, pad_id: int) -> torch.Tensor:
    """Summed log-prob of each sample under `module` (a `ResponseLogps`): samples 2i and 2i+1
    share a prompt, so they go through the pair path as one pair."""
    n = len(samples.response_ids)
    if n % 2 or any(samples.prompt_ids[i] != samples.prompt_ids[i + 1] for i in range(0, n, 2)):
        raise ValueError("samples must come two per prompt (k even)")
    rows = [{"prompt_ids": samples.prompt_ids[i], "chosen_ids": samples.response_ids[i],
             "rejected_ids": samples.response_ids[i + 1]} for i in range(0, n, 2)]
    logps = pair_logps(module, rows, pad_id)
    return torch.stack([logps.policy_chosen, logps.policy_rejected], dim=1).reshape(-1)


def quality_metrics(samples: Samples) -> dict[str, Any]:
    """Gold reward (and its parts), well-formed share and length of the samples; per-sample
    gold scores under "_gold" for the win rate."""
    gold = toy_gold_rewards(samples.prompt_text, samples.response)
    parts = [toy_reward_parts(p, r) for p, r in zip(samples.prompt_text, samples.response)]
    return {
        "gold": fmean(gold),
        "quality": fmean(x.quality for x in parts),
        "length_bonus": fmean(x.length_bonus for x in parts),
        "well_formed": fmean(x.well_formed for x in parts),
        "length_tokens": fmean(len(r) for r in samples.response_ids),
        "_gold": gold,
    }


def win_rate(policy_gold: Sequence[float], reference_gold: Sequence[float]) -> float:
    """Share of prompts/sample slots where the policy's sample beats the reference's (ties ½),
    as the evaluate stage computes it (pipeline.evalstats.wins)."""
    return float(wins(policy_gold, reference_gold).mean())


def checkpoint_metrics(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any,
                       prompts: Sequence[Row], reference_gold: Sequence[float],
                       s: SampleSettings, seed: int) -> dict[str, float]:
    """The evaluate stage's held-out-prompt metrics for `policy` (a `ResponseLogps`):
    KL = mean over y ~ π of log π(y) − log π_ref(y), gold reward and parts, win rate against
    the reference's samples (`reference_gold`, same prompts and slots), mean length."""
    samples = generate(policy.lm, tokenizer, prompts, s, seed)
    pad = tokenizer.pad_token_id
    kl = sequence_kl(sample_logps(policy, samples, pad), sample_logps(reference, samples, pad))
    q = quality_metrics(samples)
    return {**{k: v for k, v in q.items() if not k.startswith("_")},
            "kl": float(kl.mean()), "win_rate": win_rate(q["_gold"], reference_gold)}


def online_pairs(policy: torch.nn.Module, tokenizer: Any, prompts: Sequence[Row],
                 s: SampleSettings, rounds: RoundsConfig, seed: int
                 ) -> tuple[list[Row], dict[str, int], float]:
    """One online round's data: sample the policy, score with the gold reward, pair with the
    pipeline's rules (`pipeline.pairs.build_pairs`). Returns pairs, counts, mean sample gold."""
    samples = generate(policy.lm, tokenizer, prompts, s, seed)
    scores = toy_gold_rewards(samples.prompt_text, samples.response)
    ids = [p["prompt_id"] for p in prompts for _ in range(s.k)]
    rows = [{"prompt_id": pid, "sample_index": i % s.k, "prompt_text": text, "prompt_ids": p_ids,
             "response_ids": r_ids, "response": r, "score": score}
            for i, (pid, text, p_ids, r_ids, r, score) in enumerate(
                zip(ids, samples.prompt_text, samples.prompt_ids, samples.response_ids,
                    samples.response, scores, strict=True))]
    pairs, counts = build_pairs(rows, rounds, seed)
    return pairs, counts, fmean(scores)
