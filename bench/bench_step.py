"""Our training step vs the plain HF padded step, one device, no Ray: real tokens/s, MFU, memory.

Both arms train the same randomly initialised Qwen2-shaped model (bf16 on CUDA, fp32 on
CPU, gradient checkpointing) on the same micro-batches of random tokens whose prompt and
response lengths follow a realistic mix (lognormal, capped), with the DPO sigmoid loss
from `workers.losses` and AdamW:

- plain: right-padded ``[chosen; rejected]`` rows, SDPA, ``model(input_ids,
  attention_mask).logits`` → full-vocabulary float32 log_softmax → gather → loss.
- ours: `workers.train_step.rows_to_pairs` + `pair_loss`, the code the Ray Train workers
  run: pair packing (FlexAttention block mask on CUDA, the explicit 4-D mask on CPU),
  optionally a shared prompt, and chunked response-only LM-head log-probs.

Startup check: on the first micro-batch both arms must give the same per-token log-probs
(mean over each sequence) and the same loss within the dtype's tolerance, else it exits 1.

Real tokens are ``Σ (2·prompt + chosen + rejected)`` per pair, the same number for both
arms (a shared prompt is counted twice, as the plain step computes it). MFU counts the
model flops of those tokens as the plain formulation needs them, against the device's dense
bf16 peak (H100/H200 SXM 989 TFLOP/s; `--peak-tflops` elsewhere):

    flops = 6 · N · T_real + 6 · L · d · Σ_seq len²

N = parameters in matmuls (all but the input embedding table; the LM head counted even when
tied), L layers, d hidden size (causal attention: QKᵀ and AV, forward + backward). The same
flops divide both arms' step times, so the MFU ratio is the throughput ratio.

    python bench/bench_step.py                 # tiny shape on CPU, Qwen2-0.5B shape on CUDA
    python bench/bench_step.py --device cuda --share-prompt
    python bench/bench_step.py --device cuda --profile 5    # where a step's time goes
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs without installing

from transformers import Qwen2Config, Qwen2ForCausalLM

from workers.logprobs import PairBatch, ResponseLogps, collate_pairs
from workers.losses import PairLogps, compute_loss
from workers.packing import PackedAttention
from workers.train_step import PairRows, pair_loss, policy_pair_logps, rows_to_pairs

SHAPES = {  # Qwen2-0.5B as published; tiny for a CPU smoke run
    "qwen2-0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                   "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
                   "max_position_embeddings": 32768, "rope_theta": 1e6,
                   "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1024,
             "max_position_embeddings": 2048, "tie_word_embeddings": True},
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}
BETA = 0.1
ATTN_IMPL = {"flex": "flex_attention", "mask": "sdpa", "position_ids": "flash_attention_2"}


@dataclass
class Args:
    device: str
    shape: str
    pairs: int
    steps: int
    warmup: int
    cap: int
    row_tokens: int | None
    attention: PackedAttention
    share_prompt: bool
    chunk: int
    seed: int
    peak_tflops: float | None
    profile: int


def parse_args() -> Args:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="default: tiny on CPU, else 0.5B")
    ap.add_argument("--tiny", action="store_true", help="same as --shape tiny")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch")
    ap.add_argument("--steps", type=int, help="timed micro-steps per arm (default 10 / 3)")
    ap.add_argument("--warmup", type=int, help="untimed micro-steps first (default 3 / 1)")
    ap.add_argument("--cap", type=int, help="max tokens per sequence (default 2048 / 256)")
    ap.add_argument("--row-tokens", type=int,
                    help="packed row budget (default: workers.packing's, one row for flex)")
    ap.add_argument("--attention", choices=["flex", "mask", "position_ids"],
                    help="ours: flex on CUDA, mask on CPU (position_ids = flash-attn varlen)")
    ap.add_argument("--share-prompt", action="store_true", help="ours: prompt once per pair")
    ap.add_argument("--chunk", type=int, default=4096, help="LM-head rows per chunk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, help="device peak dense bf16 TFLOP/s")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed steps, profile N more micro-steps per arm (torch"
                         ".profiler): the top ops by device and by host time, and dynamo's"
                         " compile counters")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    shape = "tiny" if a.tiny else a.shape or ("qwen2-0.5b" if cuda else "tiny")
    small = shape == "tiny"
    cap = a.cap or (256 if small else 2048)
    warmup = a.warmup if a.warmup is not None else (1 if small else 3)
    return Args(a.device, shape, a.pairs, a.steps or (3 if small else 10), warmup, cap,
                a.row_tokens, a.attention or ("flex" if cuda else "mask"), a.share_prompt,
                a.chunk, a.seed, a.peak_tflops, a.profile)


def length_mix(pairs: int, cap: int, gen: torch.Generator) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) lengths: lognormal, medians 6% (prompt) and 12% (responses)
    of the cap, σ 1.0 and 0.9; the prompt at most half the cap, each sequence at most the cap."""
    def lognormal(median: float, sigma: float, hi: int) -> int:
        z = torch.randn((), generator=gen).item()
        return max(1, min(hi, round(median * math.exp(sigma * z))))

    out = []
    for _ in range(pairs):
        p = lognormal(0.06 * cap, 1.0, cap // 2)
        out.append((p, lognormal(0.12 * cap, 0.9, cap - p), lognormal(0.12 * cap, 0.9, cap - p)))
    return out


def random_rows(lengths: list[tuple[int, int, int]], vocab: int, gen: torch.Generator) -> dict:
    def tokens(k: int) -> list[int]:
        return torch.randint(1, vocab, (k,), generator=gen).tolist()

    return {"prompt_ids": [tokens(p) for p, _, _ in lengths],
            "chosen_ids": [tokens(c) for _, c, _ in lengths],
            "rejected_ids": [tokens(r) for _, _, r in lengths]}


def real_tokens(rows: dict) -> int:
    return sum(2 * len(p) + len(c) + len(r) for p, c, r in
               zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]))


def model_flops(rows: dict, cfg: Qwen2Config, n_matmul: int) -> float:
    squares = sum((len(p) + len(y)) ** 2 for key in ("chosen_ids", "rejected_ids")
                  for p, y in zip(rows["prompt_ids"], rows[key]))
    attention = 6.0 * cfg.num_hidden_layers * cfg.hidden_size * squares
    return 6.0 * n_matmul * real_tokens(rows) + attention


def plain_sums(model: Qwen2ForCausalLM, batch: PairBatch) -> torch.Tensor:
    """The plain HF way: full logits, full-vocabulary float32 log_softmax, gather, masked sum."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return (tok * batch.response_mask[:, :-1]).sum(dim=1)


def dpo_loss(sums: torch.Tensor, counts: torch.Tensor,
             ref: dict[str, torch.Tensor]) -> torch.Tensor:
    n = sums.shape[0] // 2
    lengths = counts.to(torch.float32)
    logps = PairLogps(policy_chosen=sums[:n], policy_rejected=sums[n:], chosen_len=lengths[:n],
                      rejected_len=lengths[n:], **ref)
    return compute_loss("sigmoid", logps, beta=BETA).mean()


def set_attention(model: Qwen2ForCausalLM, impl: str) -> None:
    if model.config._attn_implementation != impl:
        model.set_attn_implementation(impl)


def ref_columns(rows: dict, vocab: int, gen: torch.Generator) -> dict:
    """Reference log-probs near a uniform model's (random weights are near uniform), so the
    loss starts near log 2 with gradients of ordinary size."""
    def ref(key: str) -> list[float]:
        return [-math.log(vocab) * len(y) + torch.randn((), generator=gen).item()
                for y in rows[key]]

    return {**rows, "ref_chosen_logp": ref("chosen_ids"), "ref_rejected_logp": ref("rejected_ids")}


class Arms:
    """The two training steps, sharing one model and one AdamW."""

    def __init__(self, model: Qwen2ForCausalLM, args: Args):
        self.model, self.args, self.device = model, args, torch.device(args.device)
        self.module = ResponseLogps(model, args.chunk)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def plain_batch(self, rows: dict) -> PairBatch:
        set_attention(self.model, "sdpa")
        return collate_pairs(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"],
                             pad_id=0).to(self.device)

    def plain_loss(self, rows: dict, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain HF step's loss and per-sequence sums."""
        sums = plain_sums(self.model, batch)
        ref = {k: torch.as_tensor(rows[f"{k}_logp"], dtype=torch.float32, device=self.device)
               for k in ("ref_chosen", "ref_rejected")}
        return dpo_loss(sums, batch.counts, ref), sums

    def ours_pairs(self, rows: dict) -> PairRows:
        set_attention(self.model, ATTN_IMPL[self.args.attention])
        pairs = rows_to_pairs(rows, pad_id=0, packing=self.args.attention,
                              share_prompt=self.args.share_prompt, row_tokens=self.args.row_tokens)
        pairs.batch = pairs.batch.to(self.device)
        return pairs

    def step_plain(self, rows: dict) -> PairBatch:
        batch = self.plain_batch(rows)
        self._finish(self.plain_loss(rows, batch)[0])
        return batch

    def step_ours(self, rows: dict) -> PairBatch:
        pairs = self.ours_pairs(rows)
        self._finish(pair_loss(self.module, pairs, "sigmoid", {"beta": BETA})[0])
        return pairs.batch

    def _finish(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def check(self, rows: dict, tol: float) -> tuple[bool, str]:
        """Same micro-batch through both arms: mean token log-prob per sequence and loss."""
        batch = self.plain_batch(rows)
        plain_loss, plain = self.plain_loss(rows, batch)
        logps = policy_pair_logps(self.module, self.ours_pairs(rows))
        ours_loss = compute_loss("sigmoid", logps, beta=BETA).mean()
        ours = torch.cat([logps.policy_chosen, logps.policy_rejected])
        counts = batch.counts.to(torch.float32)
        gap = float(((ours - plain) / counts).abs().max())
        loss_gap = abs(float(ours_loss) - float(plain_loss))
        ok = gap <= tol and loss_gap <= tol
        return ok, (f"check (tol {tol:g}): max |Δ mean token log-prob| {gap:.2e}, loss plain "
                    f"{float(plain_loss):.5f} ours {float(ours_loss):.5f}: "
                    + ("ok" if ok else "FAILED"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, step, rows: dict) -> tuple[float, int, PairBatch]:
    """Seconds, peak bytes allocated (0 off CUDA) and the batch of one micro-step."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    batch = step(rows)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return time.perf_counter() - t0, peak, batch


def build_model(args: Args) -> Qwen2ForCausalLM:
    torch.manual_seed(args.seed)
    cuda = args.device.startswith("cuda")
    cfg = Qwen2Config(**SHAPES[args.shape], attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to(args.device, dtype=torch.bfloat16 if cuda else torch.float32)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model.train()


def matmul_params(model: Qwen2ForCausalLM) -> int:
    cfg = model.config
    embed = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embed + cfg.vocab_size * cfg.hidden_size


def peak_tflops(args: Args) -> float | None:
    if args.peak_tflops or not args.device.startswith("cuda"):
        return args.peak_tflops
    name = torch.cuda.get_device_name(torch.device(args.device))
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def describe_device(args: Args) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(args.device))} ({args.device}), bf16"
    return f"cpu ({torch.get_num_threads()} threads), float32"


def run(args: Args) -> int:
    model = build_model(args)
    arms = Arms(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = model.config
    batches = [ref_columns(random_rows(length_mix(args.pairs, args.cap, gen), cfg.vocab_size,
                                       gen), cfg.vocab_size, gen)
               for _ in range(args.warmup + args.steps + args.profile)]
    batches, fresh = batches[:args.warmup + args.steps], batches[args.warmup + args.steps:]
    n_matmul = matmul_params(model)
    print(f"device: {describe_device(args)}; shape {args.shape} (N_matmul {n_matmul / 1e6:.1f}M), "
          f"{args.pairs} pairs/micro-batch, cap {args.cap}, {args.warmup} warm-up + "
          f"{args.steps} timed steps per arm, ours: {args.attention}"
          + (" + shared prompt" if args.share_prompt else ""))
    timed_rows = batches[args.warmup:]
    prompt = sum(2 * len(p) for r in timed_rows for p in r["prompt_ids"])
    real = sum(real_tokens(r) for r in timed_rows)
    print(f"length mix: {real / len(timed_rows):.0f} real tokens/micro-batch, prompt (twice) "
          f"{prompt / real:.1%} of them")
    ok, line = arms.check(batches[0], 1e-4 if model.dtype == torch.float32 else 5e-2)
    print(line)
    if not ok:
        return 1
    device = torch.device(args.device)
    # seconds, peak bytes, row tokens, LM-head rows (plain: every position; ours: responses)
    totals = {"plain": [0.0, 0, 0, 0], "ours": [0.0, 0, 0, 0]}
    for i, rows in enumerate(batches):
        order = (("plain", arms.step_plain), ("ours", arms.step_ours))
        for name, step in (order if i % 2 else order[::-1]):  # alternate who goes first
            seconds, peak, batch = timed(device, step, rows)
            if i >= args.warmup:
                t = totals[name]
                head = batch.input_ids.numel() if name == "plain" else int(batch.counts.sum())
                t[0], t[1] = t[0] + seconds, max(t[1], peak)
                t[2], t[3] = t[2] + batch.input_ids.numel(), t[3] + head
    flops = sum(model_flops(r, cfg, n_matmul) for r in timed_rows)
    peak = peak_tflops(args)
    rate = {k: real / v[0] for k, v in totals.items()}
    computed = {"plain": real, "ours": real - (prompt // 2 if args.share_prompt else 0)}
    for name, t in totals.items():
        print(f"padding fraction, {name}: {1 - computed[name] / t[2]:.3f} "
              f"({t[2] / real:.3f} row tokens, {t[3] / real:.3f} LM-head rows per real token)")
    for name, t in totals.items():
        print(f"real tokens/s, {name}: {rate[name]:.0f}")
    for name, t in totals.items():
        mfu = f"{flops / t[0] / (peak * 1e12):.1%}" if peak else "n/a (no peak for this device)"
        print(f"MFU, {name}: {mfu}   [(6·N·T_real + 6·L·d·Σlen²) / time / peak]")
    for name, t in totals.items():
        mem = f"{t[1] / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (cpu)"
        print(f"peak memory, {name}: {mem}")
    print(f"ours/plain real tokens/s ratio: {rate['ours'] / rate['plain']:.2f}")
    if args.profile:
        profile_arms(arms, fresh, device)  # batches not seen before: new shapes
    return 0


def profile_arms(arms: Arms, batches: list[dict], device: torch.device) -> None:
    """Each arm's micro-steps on `batches` under torch.profiler: the ten ops with the most
    self device time and the ten with the most host time, and dynamo's counters (a flex
    block mask whose closure changes every batch would show as recompiles)."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    before = {k: dict(v) for k, v in counters.items()}
    for name, step in (("plain", arms.step_plain), ("ours", arms.step_ours)):
        synchronize(device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for rows in batches:
                step(rows)
            synchronize(device)
        wall = time.perf_counter() - t0
        table = prof.key_averages()
        print(f"profile, {name}: {len(batches)} micro-steps in {wall:.3f} s (profiler on)")
        for key in (["self_device_time_total"] if device.type == "cuda" else []) + [
                "cpu_time_total"]:
            print(table.table(sort_by=key, row_limit=10, max_name_column_width=60))
    after = {k: dict(v) for k, v in counters.items()}
    changed = {f"{k}.{n}": c - before.get(k, {}).get(n, 0) for k, v in after.items()
               for n, c in v.items() if c != before.get(k, {}).get(n, 0)}
    print(f"dynamo counters during the profiled steps: {changed or 'none'}")


def main() -> None:
    raise SystemExit(run(parse_args()))


if __name__ == "__main__":
    main()
