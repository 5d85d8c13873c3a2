"""What training does with a NaN/inf: skip the batch and count it, or stop and name it.

Every rank must take the same decision (a rank that skips while another steps would hang
the next collective), so each check reduces its flag over the process group first. The
guard only records; the train loop acts on what it returns.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


def all_ranks(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only if `flag` is true on every rank (no-op outside torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def local_weights_finite(module: torch.nn.Module) -> bool:
    """This rank's weights are all finite (its ZeRO-3 partitions, or the full tensors)."""
    for p in module.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        if t.numel() and not bool(torch.isfinite(t).all()):
            return False
    return True


NAN_GRADIENT_ENV = "RAYALIGN_TEST_NAN_GRADIENT_STEPS"


def inject_nan_gradient(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Fault injection for tests: when the workers' env sets RAYALIGN_TEST_NAN_GRADIENT_STEPS
    (comma-separated optimizer steps), rank 0's loss at those steps keeps its finite value
    but backpropagates NaN, so DeepSpeed sees a NaN gradient with a finite loss."""
    steps = os.environ.get(NAN_GRADIENT_ENV, "")
    if rank == 0 and steps and step in {int(s) for s in steps.split(",")}:
        loss.register_hook(lambda g: torch.full_like(g, float("nan")))
    return loss


@dataclass
class NonFiniteGuard:
    """Counts batches dropped for a non-finite loss or gradient and decides when to stop.

    policy 'skip': drop the batch (the next one takes its place) and go on, until more than
    `max_skipped` were dropped. policy 'stop': stop at the first one.
    """

    policy: str
    max_skipped: int
    skipped: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None

    def record(self, what: str, step: int, ids: Iterable[str]) -> bool:
        """Record a dropped batch (`what`: 'loss', 'gradient' or 'weights'); True: stop now."""
        self.skipped += 1
        self.events.append({"what": what, "step": step, "ids": [str(i) for i in ids]})
        if self.policy == "stop" or what == "weights":
            self.stop_reason = (f"non-finite {what} at optimizer step {step}"
                                f" (train.on_nonfinite={self.policy})")
        elif self.skipped > self.max_skipped:
            self.stop_reason = (f"{self.skipped} batches had a non-finite loss or gradient, more"
                                f" than train.max_nonfinite={self.max_skipped}")
        return self.stop_reason is not None
