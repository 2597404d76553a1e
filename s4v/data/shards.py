"""Which samples each rank and worker reads, in which order, and where a resumed run continues.

Pure Python/numpy. A sample is addressed as a global id `g` = (samples in earlier shards of the
split index) + its ordinal inside its tar, so a rank can read any sample by offset (reader.py).

Epoch plan (train), a pure function of (index, seed, epoch, world_size, rank, batch_size):
1. shuffle the shard order with rng(seed, epoch);
2. concatenate the shards' samples and cut the sequence into `world_size` contiguous,
   near-equal ranges (sizes differ by at most one sample; a range may start mid-shard);
3. inside the rank's range, permute samples within consecutive windows of `shuffle_buffer`
   samples (I/O stays within a few shards, and the order is data, not a stateful buffer);
4. cut into batches of `batch_size`. Batch b is produced by worker `b % num_workers`.

Uneven counts: **train drops** each rank's tail so every rank runs
`floor(floor(N / world_size) / batch_size)` batches (fewer than world_size * batch_size samples are
left out per epoch, and different ones each epoch because shards are reshuffled). **Eval pads**:
shard order is the index order, no shuffling, every rank runs `ceil(ceil(N / world_size) / batch_size)`
batches, and slots past the rank's range are padding (`-1`), delivered with `valid = False`, so the
valid samples over all ranks are exactly the split, once.

Resume: batch contents do not depend on the worker count, so the position is just
(epoch, next batch index): `LoaderPosition`. A rank that consumed b batches has consumed exactly
the samples of batches [0, b). On another world size (elastic resume) the samples of the epoch that no
rank has trained are dealt anew over the new ranks (`elastic_epoch_batches`): the epoch goes on with no
sample twice and none skipped beyond the whole-batch remainder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from s4v.data.format import SplitIndex

PAD = -1  # sample id of an eval padding slot


def check_shard_count(num_shards: int, world_size: int, num_workers: int, min_per_reader: int = 1) -> None:
    """Raise unless every (rank, worker) reader has `min_per_reader` shards' worth of data.

    Correctness does not need it (samples are addressed by offset), but with fewer shards all
    readers hit the same files and each shuffle window draws from a single shard.
    """
    need = min_per_reader * world_size * max(1, num_workers)
    if num_shards < need:
        raise ValueError(
            f"{num_shards} shards for {world_size} ranks x {max(1, num_workers)} workers: need at least {need} "
            f"(data.min_shards_per_reader={min_per_reader}); write more, smaller shards, lower "
            f"data.num_workers, or set data.min_shards_per_reader=0")


@dataclass(frozen=True)
class ShardTable:
    """Shard names and sample counts of a split, with global-id arithmetic."""

    names: tuple[str, ...]
    counts: tuple[int, ...]

    @classmethod
    def from_index(cls, index: SplitIndex) -> "ShardTable":
        return cls(tuple(s.name for s in index.shards), tuple(int(s.samples) for s in index.shards))

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts))

    def locate(self, gid: int) -> tuple[int, int]:
        """(shard index, ordinal inside the shard) of a global sample id."""
        off = self.offsets
        s = int(np.searchsorted(off, gid, side="right") - 1)
        return s, int(gid - off[s])


def _epoch_rng(seed: int, epoch: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, 0x5EED, epoch, *extra])


def rank_sequence(table: ShardTable, seed: int, epoch: int, world_size: int, rank: int, shuffle: bool,
                  window: int) -> np.ndarray:
    """The global ids this rank reads in `epoch`, in reading order (steps 1-3 of the module doc)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    off = table.offsets
    order = _epoch_rng(seed, epoch).permutation(len(table.counts)) if shuffle else np.arange(len(table.counts))
    seq = np.concatenate([np.arange(off[s], off[s + 1]) for s in order] or [np.zeros(0, np.int64)])
    n = len(seq)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    mine = seq[lo:hi].copy()
    if shuffle:
        rng = _epoch_rng(seed, epoch, rank + 1)
        for w0 in range(0, len(mine), window):
            rng.shuffle(mine[w0:w0 + window])
    return mine


def batches_per_epoch(num_samples: int, world_size: int, batch_size: int, train: bool) -> int:
    if train:
        return (num_samples // world_size) // batch_size
    per_rank = -(-num_samples // world_size)  # ceil
    return -(-per_rank // batch_size)


def epoch_batches(table: ShardTable, seed: int, epoch: int, world_size: int, rank: int, batch_size: int,
                  train: bool, window: int) -> np.ndarray:
    """[num_batches, batch_size] global ids of this rank's batches (PAD marks eval padding)."""
    seq = rank_sequence(table, seed, epoch, world_size, rank, shuffle=train, window=window)
    nb = batches_per_epoch(table.num_samples, world_size, batch_size, train)
    if train:
        return seq[:nb * batch_size].reshape(nb, batch_size)
    out = np.full(nb * batch_size, PAD, np.int64)
    out[:len(seq)] = seq
    return out.reshape(nb, batch_size)


def deal(seq: np.ndarray, world_size: int, rank: int, batch_size: int) -> np.ndarray:
    """[num_batches, batch_size]: `rank`'s contiguous share of `seq`, cut into whole batches. Every rank
    gets the same number of batches (the shortest share's); the rest is left out."""
    n = len(seq)
    nb = (n // world_size) // batch_size
    lo = rank * n // world_size
    return seq[lo:lo + nb * batch_size].reshape(nb, batch_size)


def untrained_after(table: ShardTable, seed: int, epoch: int, window: int, segments: Sequence[dict]) -> np.ndarray:
    """The samples of training epoch `epoch` that no rank has trained yet, after the run went through
    `segments` of the epoch on different world sizes: each segment is {"world_size", "batch_size", "done"},
    `done[r]` the batches rank r had consumed when that world stopped. Batch-major order (batch j of
    every rank, then j + 1), so a re-dealt remainder keeps the epoch's shuffle."""
    seq = None
    for seg in segments:
        w, b, done = int(seg["world_size"]), int(seg["batch_size"]), [int(x) for x in seg["done"]]
        if len(done) != w:
            raise ValueError(f"elastic segment of {w} ranks lists {len(done)} positions")
        plans = ([epoch_batches(table, seed, epoch, w, r, b, True, window) for r in range(w)] if seq is None
                 else [deal(seq, w, r, b) for r in range(w)])
        rest = [plan[d:] for plan, d in zip(plans, done)]
        depth = max((len(x) for x in rest), default=0)
        seq = np.array([i for j in range(depth) for x in rest if j < len(x) for i in x[j]], np.int64)
    return seq if seq is not None else np.zeros(0, np.int64)


def elastic_epoch_batches(table: ShardTable, seed: int, epoch: int, world_size: int, rank: int, batch_size: int,
                          window: int, segments: Sequence[dict]) -> np.ndarray:
    """This rank's training batches of `epoch`: the plan of `epoch_batches`, or, in an epoch resumed on
    another world size (`segments` non-empty), its share of the samples not trained yet."""
    if not segments:
        return epoch_batches(table, seed, epoch, world_size, rank, batch_size, True, window)
    return deal(untrained_after(table, seed, epoch, window, segments), world_size, rank, batch_size)


def worker_batches(num_batches: int, start: int, worker: int, num_workers: int) -> range:
    """Batch indices that `worker` of `num_workers` produces when an epoch resumes at `start`.

    Round-robin from `start`, which matches the order in which torch's DataLoader collects results
    from its workers, so batches reach the training loop as start, start + 1, ...
    """
    return range(start + worker, num_batches, max(1, num_workers))


@dataclass
class LoaderPosition:
    """Exact data position of one rank: the next batch to deliver in `epoch`."""

    epoch: int = 0
    batch: int = 0
    # fingerprint of the plan; a checkpoint only resumes into the same plan
    seed: int = 0
    world_size: int = 1
    rank: int = 0
    batch_size: int = 1
    num_samples: int = 0
    train: bool = True
    shuffle_buffer: int = 1
    shards: Sequence[str] = ()
    # this epoch's earlier parts on other world sizes (see `untrained_after`); empty in a normal epoch
    segments: Sequence[dict] = ()

    def state_dict(self) -> dict:
        d = asdict(self)
        d["shards"] = list(self.shards)
        d["segments"] = [dict(x) for x in self.segments]
        return d

    def check_compatible(self, other: dict, elastic: bool = False) -> None:
        """Raise unless `other` (a saved position) belongs to the same plan; `elastic`: of the same data
        and seed, on any world size and batch size."""
        mine = self.state_dict()
        free = {"epoch", "batch", "segments"} | ({"world_size", "rank", "batch_size"} if elastic else set())
        diff = {k: (other.get(k), mine[k]) for k in mine if k not in free and other.get(k) != mine[k]}
        if diff:
            raise ValueError(f"loader state does not match this loader (saved, current): {diff}; the data "
                             f"position can only be restored with the same shards, seed, world size, rank and batch size")
