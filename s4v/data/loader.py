"""`build_loader`: the one entry point of the training loop into the input pipeline.

    loader = build_loader(cfg.data, cfg.data.train_split, train=True, rank=r, world_size=w, device="cuda")
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)        # no-op when a restored state already points into `epoch`
        for batch in loader:           # dict of torch types, see s4v/data/batch.py
            ...
        state["data"] = loader.state_dict()   # save with the checkpoint; load_state_dict to resume

Iterating delivers the *remaining* batches of the current epoch and then advances the position
to (epoch + 1, 0); `len(loader)` is the full number of batches per epoch on every rank (equal
across ranks, see shards.py for the uneven-shard policy).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from s4v.data.augment import num_views
from s4v.data.config import DataConfig
from s4v.data.format import INDEX_NAME, SplitIndex
import numpy as np

from s4v.data.shards import (LoaderPosition, ShardTable, batches_per_epoch, check_shard_count, elastic_epoch_batches,
                            epoch_batches)

log = logging.getLogger("s4v.data")


class Loader:
    """Iterable of batch dicts with an exact, resumable position (one per rank)."""

    def __init__(self, cfg: DataConfig, root: str, split: str, train: bool, rank: int, world_size: int,
                 epoch: int, engine):
        self.cfg, self.root, self.split, self.train = cfg, root, split, train
        self.rank, self.world_size, self.engine = rank, world_size, engine
        self.table = engine.table
        self.pos = LoaderPosition(epoch=epoch, batch=0, seed=cfg.seed, world_size=world_size, rank=rank,
                                  batch_size=cfg.batch_size, num_samples=self.table.num_samples, train=train,
                                  shuffle_buffer=cfg.shuffle_buffer, shards=self.table.names)
        self.skipped = 0  # samples that could not be delivered (over this object's lifetime)
        self.skipped_keys: list[tuple[str, str]] = []  # (key, reason) of each skipped sample

    def __len__(self) -> int:
        return batches_per_epoch(self.table.num_samples, self.world_size, self.cfg.batch_size, self.train)

    @property
    def epoch(self) -> int:
        return self.pos.epoch

    @property
    def batches_done(self) -> int:
        """Batches of the current epoch already delivered (non-zero after a mid-epoch resume)."""
        return self.pos.batch

    @property
    def clips_per_batch(self) -> int:
        """Model inputs per batch: batch_size * repeated_aug (train) or batch_size * views (eval)."""
        return self.cfg.batch_size * num_views(self.cfg, self.train)

    @property
    def batches_in_epoch(self) -> int:
        """Batches of the current epoch on this rank: len(self), or fewer in an epoch re-dealt after an
        elastic resume."""
        return len(self.epoch_plan()) if self.pos.segments else len(self)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`, unless the position is already inside it (resume)."""
        if epoch != self.pos.epoch:
            self.pos.epoch, self.pos.batch, self.pos.segments = epoch, 0, ()

    def state_dict(self) -> dict:
        return self.pos.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pos.check_compatible(state)
        self.pos.epoch, self.pos.batch = int(state["epoch"]), int(state["batch"])
        self.pos.segments = tuple(state.get("segments", ()))

    def resume_from(self, states: list[dict]) -> None:
        """Continue where the ranks that saved `states` (one per rank, any world size) stopped: the same
        position on the same world size; else the untrained rest of the epoch dealt over these ranks."""
        if len(states) == self.world_size and states[self.rank].get("batch_size") == self.cfg.batch_size:
            return self.load_state_dict(states[self.rank])
        if not self.train:
            raise ValueError("only a training loader resumes on another world size")
        for state in states:
            self.pos.check_compatible(state, elastic=True)
        epochs = {int(s["epoch"]) for s in states}
        if len(epochs) != 1:
            raise ValueError(f"the saved ranks stopped in different epochs {sorted(epochs)}")
        first = states[0]
        segment = {"world_size": len(states), "batch_size": int(first["batch_size"]),
                   "done": [int(s["batch"]) for s in states]}
        self.pos.epoch, self.pos.batch = epochs.pop(), 0
        earlier = tuple(first.get("segments", ()))
        self.pos.segments = earlier + (segment,) if any(segment["done"]) else earlier
        if self.pos.segments:
            log.info("data: epoch %d re-dealt over %d ranks: %d batches of %d per rank left", self.pos.epoch,
                     self.world_size, self.batches_in_epoch, self.cfg.batch_size)

    def epoch_plan(self) -> np.ndarray:
        """[batches, batch_size] sample ids of this rank's current epoch."""
        if self.train:
            return elastic_epoch_batches(self.table, self.cfg.seed, self.pos.epoch, self.world_size, self.rank,
                                         self.cfg.batch_size, self.cfg.shuffle_buffer, self.pos.segments)
        return epoch_batches(self.table, self.cfg.seed, self.pos.epoch, self.world_size, self.rank,
                             self.cfg.batch_size, False, self.cfg.shuffle_buffer)

    def __iter__(self) -> Iterator[dict]:
        epoch, start = self.pos.epoch, self.pos.batch
        batches = self.epoch_plan()
        if start < len(batches):
            expect = start
            for batch in self.engine.iter_batches(batches, start, epoch):
                index = batch.pop("_index")
                if index != expect:  # the position would no longer be exact
                    raise RuntimeError(f"loader delivered batch {index}, expected {expect}")
                for key, reason in batch.pop("_skipped"):
                    self.skipped += 1
                    self.skipped_keys.append((key, reason))
                    log.warning("data: skipped sample %s (%s); %d skipped so far", key, reason, self.skipped)
                expect = self.pos.batch = index + 1
                yield batch
            if expect != len(batches):
                raise RuntimeError(f"loader stopped after batch {expect} of {len(batches)}")
        self.pos.epoch, self.pos.batch, self.pos.segments = epoch + 1, 0, ()


def check_shards_exist(root: str, split: str, names) -> None:
    """Every shard the split index lists must exist: a missing file is an error at start (listing the
    missing names), not a crash of a reader mid-epoch or a silently smaller epoch."""
    missing = [n for n in names if not (Path(root) / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"split {split!r}: {len(missing)} of {len(names)} shards listed in {Path(root) / INDEX_NAME.format(split=split)} "
            f"are missing: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} (incomplete copy or "
            f"data_prep run? rerun `python -m data_prep.shard` or restore the files)")


def build_loader(cfg: DataConfig, split: str, train: bool, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 device: str = "cpu") -> Loader:
    """Loader over `{cfg.root}/{split}-*.tar` for this rank.

    `device` is where batches are wanted ("cpu", "cuda", "cuda:N"). The DALI engine decodes on the
    GPU when `cfg.device == "gpu"` and returns CUDA tensors; the PyAV engine returns CPU tensors
    (pinned if `device` is CUDA) and the caller moves them.
    """
    cfg.validate()
    index = SplitIndex.load(cfg.root, split)
    table = ShardTable.from_index(index)
    if table.num_samples == 0:
        raise ValueError(f"split {split!r} under {cfg.root} has no samples")
    check_shards_exist(cfg.root, split, table.names)
    readers = 1 if cfg.loader == "dali" else cfg.num_workers
    if cfg.min_shards_per_reader > 0:
        check_shard_count(len(table.names), world_size, readers, cfg.min_shards_per_reader)
    if len(table.names) and batches_per_epoch(table.num_samples, world_size, cfg.batch_size, train) == 0:
        raise ValueError(f"split {split!r}: {table.num_samples} samples give no batch of {cfg.batch_size} "
                         f"on each of {world_size} ranks")
    root = str(Path(cfg.root))
    if cfg.loader == "dali":
        from s4v.data.dali_pipeline import DaliEngine

        engine = DaliEngine(cfg, root, table, train, device=device)
    else:
        from s4v.data.pyav_loader import PyAVEngine

        engine = PyAVEngine(cfg, root, table, train, device=device)
    return Loader(cfg, root, split, train, rank, world_size, epoch, engine)
