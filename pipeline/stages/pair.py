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


def run_pair(scored_dir: Path, cfg: RunConfig, seed: int, out_dir: Path,
             carried: Path | None = None) -> dict[str, Any]:
    """This round's pairs, plus the pairs an earlier round could not train on (`carried`,
    see `pipeline.stages.train.run_train`). A round may yield no pair at all (all ties):
    that is not an error, its pairs are simply fewer."""
    samples = pq.read_table(str(scored_dir)).to_pylist()
    pairs, counts = build_pairs(samples, cfg.rounds, seed)
    table = pa.Table.from_pylist(pairs, SAMPLED_PAIR_SCHEMA)
    if carried is not None and carried.exists():
        earlier = pq.read_table(str(carried))
        for f in SAMPLED_PAIR_SCHEMA:  # e.g. no win rates: a loss that needs them refuses the mode
            if f.name not in earlier.column_names:
                earlier = earlier.append_column(f, pa.nulls(earlier.num_rows, f.type))
        table = pa.concat_tables([earlier.select(SAMPLED_PAIR_SCHEMA.names).cast(SAMPLED_PAIR_SCHEMA),
                                  table])
        counts["carried_in"] = earlier.num_rows
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_dir / "pairs.parquet")
    return counts
