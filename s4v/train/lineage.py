"""Sample lineage (`train.log_samples`): `<run_dir>/samples/rank{R}.jsonl`, one line per micro-batch
with the epoch, the optimizer step it contributes to, its place in the step's window and the sample
keys (and `"skipped": true` when the window's update was skipped), so "which clips were in step 40,000"
has an answer.

Each checkpoint records every file's size (those of ranks an earlier, wider world had too); a resume
cuts the files back to those sizes, so after any number of interruptions (and on other world sizes)
the files hold each trained micro-batch once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

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

    def sizes_from_rank(self, first_rank: int) -> dict[int, int]:
        """Rank 0, at a checkpoint: the sizes of the files of ranks >= `first_rank` (left by an earlier,
        wider world; no rank writes them now), so that a resume from this checkpoint keeps their rows."""
        return {r: path.stat().st_size for r, path in self._files() if r >= first_rank}

    def rewind(self, saved_sizes: Sequence[Optional[int]], former_ranks: Mapping[int, int] = {}) -> None:
        """Cut every rank's file back to its size at the checkpoint: `saved_sizes[r]` for the ranks that
        wrote it, `former_ranks[r]` for files of an earlier, wider world that it kept; a file the checkpoint
        does not know was started after it and is emptied. Rank 0 does it while the others wait."""
        self.file.close()
        if self.rank == 0:
            sizes = {**{int(r): n for r, n in former_ranks.items()}, **dict(enumerate(saved_sizes))}
            for r, path in self._files():
                with open(path, "r+b") as f:
                    f.truncate(min(sizes.get(r) or 0, path.stat().st_size))
        barrier()
        self.file = open(self.path, "a", buffering=1)

    def _files(self) -> list[tuple[int, Path]]:
        return [(int(path.stem[len("rank"):]), path) for path in sorted(self.dir.glob("rank*.jsonl"))]


def read_lineage(run_dir: Path) -> list[dict]:
    """Every line of every rank's file, with its rank."""
    rows = []
    for path in sorted((Path(run_dir) / "samples").glob("rank*.jsonl")):
        rank = int(path.stem[len("rank"):])
        rows += [dict(json.loads(line), rank=rank) for line in path.read_text().splitlines() if line]
    return rows
