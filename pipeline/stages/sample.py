"""sample: the current policy answers a round's prompts on the run's policy engines.

The engines live for the whole run (pipeline.engines): before the stage they load the
previous round's exported checkpoint in place, no engine restart.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import PrepareConfig, RunConfig
from pipeline.preflight import expand_paths


def prompt_pool(cfg: RunConfig, prepared_train: Path | None) -> list[dict[str, Any]]:
    """Every prompt a round may sample from: {prompt_id, prompt_text, prompt_messages,
    prompt_ids} (pipeline.stages.prepare.PAIR_SCHEMA says what each is)."""
    if cfg.rounds.prompts:
        from transformers import AutoTokenizer

        from pipeline.data import prompt_columns, render_prompt
        from pipeline.stages.prepare import file_rows

        tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path,
                                            trust_remote_code=cfg.model.trust_remote_code)
        render_cfg = PrepareConfig(chat_template="always",
                                system_prompt=cfg.data.system_prompt)
        pool = []
        for path in expand_paths(cfg.rounds.prompts, "rounds.prompts"):
            for i, row in file_rows(path):
                prompt = row.get("prompt") if row.get("prompt") is not None else row.get("messages")
                if prompt is None:
                    raise ValueError(f"{path}: row {i}: no 'prompt' (or 'messages') value")
                ids = tok(render_prompt(prompt, tok, render_cfg), add_special_tokens=False)["input_ids"]
                pool.append({"prompt_id": str(row.get("id") or f"{Path(path).name}:{i}"),
                             **prompt_columns(prompt, render_cfg),
                             "prompt_ids": ids[-cfg.data.max_prompt_tokens:]})
        return pool
    if prepared_train is None:
        raise ValueError("online rounds need prompts: set rounds.prompts or data.train")
    # one entry per distinct prompt as the model sees it: conversations that end in the same
    # question after different earlier turns are different prompts
    seen: dict[tuple[int, ...], dict[str, Any]] = {}
    names = pq.ParquetDataset(prepared_train).schema.names
    # (prepared by an earlier version: no prompt_messages; a reward model then reads prompt_text)
    columns = [c for c in ("prompt_text", "prompt_messages", "prompt_ids") if c in names]
    for row in pq.read_table(prepared_train, columns=columns).to_pylist():
        seen.setdefault(tuple(row["prompt_ids"]), {"prompt_id": f"p{len(seen)}", **row})
    return list(seen.values())


def round_prompts(pool: list[dict[str, Any]], cfg: RunConfig, round_index: int) -> list[dict[str, Any]]:
    """iterative: the whole pool (or its first prompts_per_round); online: a fresh slice per
    round of the seeded shuffled pool, wrapping around when it runs out."""
    order = list(range(len(pool)))
    random.Random(cfg.rounds.seed).shuffle(order)
    n = min(cfg.rounds.prompts_per_round or len(pool), len(pool))
    start = round_index * n if cfg.rounds.mode == "online" else 0
    return [pool[order[(start + i) % len(pool)]] for i in range(n)]


def run_sample(prompts: list[dict[str, Any]], client: Any, cfg: RunConfig, seed: int,
               out_dir: Path) -> int:
    """n samples per prompt into out_dir/samples/ (parquet), from the engines of `client`
    (a workers.vllm_pool.EngineClient serving the policy)."""
    from pipeline.blocks import from_table
    from pipeline.engines import fused_write_args, map_args
    from workers.vllm_pool import Sampler

    s = cfg.sampling
    sampling = {"n": s.n, "temperature": s.temperature, "top_p": s.top_p,
                "max_tokens": s.max_tokens, "seed": seed}
    table = pa.Table.from_pylist(prompts)
    ds = from_table(table, s.batch_size).map_batches(  # a block per batch: every engine is fed
        Sampler(client, sampling), batch_format="pyarrow", **map_args(s))
    ds.write_parquet(str(out_dir / "samples"), **fused_write_args(map_args(s)))
    return len(prompts) * s.n
