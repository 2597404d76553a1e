"""One metrics path: `MetricLogger.log(step, {...})` writes TensorBoard and `metrics.jsonl` on rank 0."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from s4v.fileio import atomic_write_bytes

log = logging.getLogger(__name__)


class MetricLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    def rewind(self, step: int) -> None:
        """Call after resuming from a checkpoint at `step`: the rows of later steps, logged by the
        interrupted run, are dropped from metrics.jsonl (rewritten aside and renamed into place), and
        TensorBoard purges its events after `step` (`purge_step`), so each step is logged once."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        path = self.run_dir / "metrics.jsonl"
        self.jsonl.close()
        kept, dropped, torn = [], 0, 0
        for line in path.read_text().splitlines():
            try:
                row_step = json.loads(line).get("step", -1)
            except ValueError:  # a line cut by a crash
                torn += 1
                continue
            if row_step > step:
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped or torn:
            atomic_write_bytes(path, "".join(kept).encode())
            log.info("metrics.jsonl: dropped %d rows after step %d (logged before the resume) and %d torn "
                     "lines", dropped, step, torn)
        self.jsonl = open(path, "a", buffering=1)
        self.writer.close()
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        for key, value in clean.items():
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")

    def image(self, tag: str, image_chw: torch.Tensor, step: int) -> None:
        if self.enabled:
            self.writer.add_image(tag, image_chw, step)

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()
            self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


class Meter:
    """Running mean of a scalar."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int = 1) -> None:
        self.total += value * n
        self.count += n

    @property
    def mean(self) -> Optional[float]:
        return self.total / self.count if self.count else None

    def reset(self) -> None:
        self.total, self.count = 0.0, 0


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB: CUDA allocator on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"mem/cuda_peak_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
                "mem/cuda_reserved_gib": torch.cuda.memory_reserved(device) / 2 ** 30}
    import resource

    return {"mem/host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def confusion_image(confusion: torch.Tensor) -> torch.Tensor:
    """A `[3, C, C]` image of a row-normalised confusion matrix (rows: true class)."""
    rows = confusion.float() / confusion.sum(1, keepdim=True).clamp_min(1)
    img = 1.0 - rows  # dark = frequent
    return img.unsqueeze(0).repeat(3, 1, 1)
