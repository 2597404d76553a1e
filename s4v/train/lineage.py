"""Sample lineage (`train.log_samples`): `<run_dir>/samples/rank{R}.jsonl`, one line per micro-batch
with the epoch, the optimizer step it contributes to, its place in the step's window and the sample
keys (and `"skipped": true` when the window's update was skipped), so "which clips were in step 40,000"
has an answer.

Each checkpoint records every file's size; a resume cuts the files back to those sizes, so after any
number of interruptions (and on another world size) the files hold each trained micro-batch once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from s4v.train.dist import barrier


class SampleLineage:
    def __init__(self, run_dir: Path, rank: int):
        self.dir = Path(run_dir) / "samples"
        self.rank = rank
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"rank{rank}.jsonl"
        self.file = open(self.path, "a", buffering=1)  # line-buffered: a crash keeps what led up to it

    def write(self, epoch: int, step: int, micro: int, batch: dict, applied: bool = True) -> None:
        """One micro-batch of the window that produced optimizer step `step` (`applied` False: the window's
        update was skipped, e.g. a non-finite loss, and the next window makes step `step` again)."""
        keys = [str(k) for k in batch.get("key", [])]
        valid = batch.get("valid")
        if valid is not None:  # slots of unreadable samples hold copies of good ones
            keys = [k for k, ok in zip(keys, valid.tolist()) if ok]
        row = {"epoch": epoch, "step": step, "micro": micro, "keys": keys}
        self.file.write(json.dumps(row if applied else {**row, "skipped": True}) + "\n")

    def flush(self) -> int:
        """Flush to disk; the file's size, for the checkpoint."""
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.path.stat().st_size

    def rewind(self, saved_sizes: Sequence[Optional[int]], world_size: int) -> None:
        """Cut every rank's file back to its size at the checkpoint (`saved_sizes[r]` for the ranks that
        wrote it); files of ranks the checkpoint does not know were written after it and are emptied.
        Rank 0 does it while the others wait."""
        self.file.close()
        if self.rank == 0:
            for path in self.dir.glob("rank*.jsonl"):
                r = int(path.stem[len("rank"):])
                size = saved_sizes[r] if r < len(saved_sizes) else 0
                with open(path, "r+b") as f:
                    f.truncate(min(size or 0, path.stat().st_size))
        barrier()
        self.file = open(self.path, "a", buffering=1)


def read_lineage(run_dir: Path) -> list[dict]:
    """Every line of every rank's file, with its rank."""
    rows = []
    for path in sorted((Path(run_dir) / "samples").glob("rank*.jsonl")):
        rank = int(path.stem[len("rank"):])
        rows += [dict(json.loads(line), rank=rank) for line in path.read_text().splitlines() if line]
    return rows
