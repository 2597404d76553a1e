"""One metrics path: `MetricLogger.log(step, {...})` writes TensorBoard and `metrics.jsonl` on rank 0."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch


class MetricLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir = Path(run_dir)
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)

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
