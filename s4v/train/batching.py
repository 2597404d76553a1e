"""The global batch of a run: `train.global_batch_size` (the recipe's, in samples per optimizer step)
over `data.batch_size` samples per rank per micro-batch (the memory knob) and the world size gives the
gradient accumulation, so one recipe is the same optimisation on 1, 8 or 64 GPUs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class BatchPlanError(ValueError):
    pass


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int  # samples per rank per micro-batch (data.batch_size)
    grad_accum: int  # micro-batches per optimizer step
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def describe(self) -> str:
        return (f"global batch {self.global_batch} samples = {self.micro_batch} per micro-batch x "
                f"{self.grad_accum} accumulation x {self.world_size} ranks")


def working_micro_batches(global_batch: int, world_size: int) -> list[int]:
    """Every data.batch_size that divides the global batch evenly on `world_size` ranks."""
    if global_batch % world_size:
        return []
    per_rank = global_batch // world_size
    return [b for b in range(1, per_rank + 1) if per_rank % b == 0]


def plan_batches(micro_batch: int, world_size: int, global_batch: Optional[int] = None,
                 grad_accum: Optional[int] = None) -> BatchPlan:
    """The accumulation for a run. `global_batch` (train.global_batch_size) derives it; `grad_accum`
    (train.grad_accum) sets it directly; both set must agree; neither means 1."""
    if micro_batch < 1:
        raise BatchPlanError(f"data.batch_size must be >= 1, got {micro_batch}")
    if grad_accum is not None and grad_accum < 1:
        raise BatchPlanError(f"train.grad_accum must be >= 1, got {grad_accum}")
    if global_batch is None:
        return BatchPlan(micro_batch, grad_accum or 1, world_size)
    if global_batch < 1:
        raise BatchPlanError(f"train.global_batch_size must be >= 1, got {global_batch}")
    per_step = micro_batch * world_size
    if global_batch % per_step:
        works = working_micro_batches(global_batch, world_size)
        hint = (f"data.batch_size values that work on {world_size} ranks: {', '.join(map(str, works))}" if works
                else f"{world_size} ranks do not divide it; use a world size that divides {global_batch}")
        raise BatchPlanError(f"train.global_batch_size={global_batch} is not a multiple of data.batch_size="
                             f"{micro_batch} x {world_size} ranks = {per_step}; {hint}")
    derived = global_batch // per_step
    if grad_accum is not None and grad_accum != derived:
        raise BatchPlanError(f"train.grad_accum={grad_accum} but train.global_batch_size={global_batch} with "
                             f"data.batch_size={micro_batch} on {world_size} ranks needs {derived}; set only one")
    return BatchPlan(micro_batch, derived, world_size)
