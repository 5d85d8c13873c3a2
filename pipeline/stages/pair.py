"""pair: scored samples → preference pairs (rules in pipeline.pairs), in the prepared-pair schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunConfig
from pipeline.pairs import build_pairs
from pipeline.stages.prepare import PAIR_SCHEMA

SAMPLED_PAIR_SCHEMA = PAIR_SCHEMA.append(pa.field("chosen_winrate", pa.float64())) \
    .append(pa.field("rejected_winrate", pa.float64()))


def run_pair(scored_dir: Path, cfg: RunConfig, seed: int, out_dir: Path) -> dict[str, Any]:
    samples = pq.read_table(str(scored_dir)).to_pylist()
    pairs, counts = build_pairs(samples, cfg.rounds, seed)
    if not pairs:
        raise ValueError(f"no pairs survived the pair rules: {counts}")
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(pairs, SAMPLED_PAIR_SCHEMA), out_dir / "pairs.parquet")
    return counts
