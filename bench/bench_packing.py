"""Pair-aware packing vs right-padded rows: padding fraction and training pairs/s.

Both arms run the Ray-free training step (`workers.train_step.pair_loss` + backward +
AdamW step) on the toy world's model and preference pairs, tokenised by the prepare
stage's own functions, in the same process, alternating micro-batches so that machine
noise hits both alike. Prints one line per figure, the ratio last.

    .venv/bin/python bench/bench_packing.py [--toy .toy] [--micro-batch 8] [--steps 40]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from fixtures import load_pairs
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.logprobs import ResponseLogps
from workers.packing import attention_mode
from workers.train_step import pair_loss, rows_to_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", type=Path, default=Path(".toy"))
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    if not (args.toy / "model").exists():
        from pipeline.toy import build_toy_world

        build_toy_world(args.toy, quick=False)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = AutoTokenizer.from_pretrained(args.toy / "model")
    model = AutoModelForCausalLM.from_pretrained(args.toy / "model", dtype=torch.float32)
    module = ResponseLogps(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    pairs = load_pairs(args.toy / "model", args.toy)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    arms = {"padded": None, "packed": attention_mode(model)}
    seconds = {name: 0.0 for name in arms}
    padding = {name: [0, 0] for name in arms}  # padding tokens, all tokens
    done = 0
    for step in range(args.steps + 2):  # first two micro-batches warm up, not timed
        start = (step * args.micro_batch) % (len(pairs) - args.micro_batch)
        chunk = pairs[start : start + args.micro_batch]
        rows = {k: [p[k] for p in chunk] for k in
                ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_score", "rejected_score")}
        for name, packing in (arms.items() if step % 2 else reversed(arms.items())):
            t0 = time.perf_counter()
            batch_rows = rows_to_pairs(rows, pad, packing)
            loss, _ = pair_loss(module, batch_rows, "simpo", {})  # reference-free: no ref pass
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 2:
                seconds[name] += time.perf_counter() - t0
                b = batch_rows.batch
                padding[name][0] += b.input_ids.numel() - b.real_tokens
                padding[name][1] += b.input_ids.numel()
        done += args.micro_batch if step >= 2 else 0
    frac = {n: padding[n][0] / padding[n][1] for n in arms}
    rate = {n: done / seconds[n] for n in arms}
    print(f"padding fraction, padded rows: {frac['padded']:.3f}")
    print(f"padding fraction, packed rows ({arms['packed']}): {frac['packed']:.3f}")
    print(f"pairs/s, padded rows: {rate['padded']:.1f}")
    print(f"pairs/s, packed rows: {rate['packed']:.1f}")
    print(f"packed/padded pairs/s ratio: {rate['packed'] / rate['padded']:.2f}")


if __name__ == "__main__":
    main()
