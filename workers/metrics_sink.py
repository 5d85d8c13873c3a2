"""A Ray actor that receives metric rows from workers and appends them to metrics.jsonl.

Workers on any node send rows here (an actor call, not a shared file), so the driver's
run directory gets every step even on a multi-node cluster.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsSink:
    def __init__(self, path: str, context: dict[str, Any]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.context = dict(context)

    def set_context(self, **context: Any) -> None:
        self.context.update(context)

    def log(self, kind: str, row: dict[str, Any]) -> None:
        record = {"time": time.time(), "kind": kind, **self.context, **row}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
