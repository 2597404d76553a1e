"""Captions of a split, by sample key, for text-video retrieval (wraps the shard reader; no loader change).

The loaders' batches carry each sample's `key` but not its `.json` metadata, so the captions are read
once per process from the shards' `.json` members (`ClipMeta.captions`, one seek + read per sample
through the DALI `.idx` member table) and looked up by key on the host:

    bank = CaptionBank.load(cfg.root, cfg.train_split)
    texts = bank.pick(batch["key"], epoch, seed)     # one caption per training sample
    bank.all(key)                                   # every caption of a test video

Caption choice per training sample is deterministic in (seed, key, epoch), identical on every rank
and after a resume:
- `cycle` (default): a per-video random permutation of its captions, epoch e takes entry e mod n, so
  n consecutive epochs show every caption of an n-caption video exactly once (n passes over the
  videos = one "every caption a sample" epoch, the MSR-VTT `expand_msrvtt_sentences` setting);
- `random`: an independent uniform choice per (epoch, key).
"""
from __future__ import annotations

import os
from typing import Literal, Sequence

import numpy as np

from s4v.data.format import ClipMeta, SplitIndex
from s4v.data.reader import index_tar
from s4v.data.sampling import key_hash

CaptionSampling = Literal["cycle", "random"]
_STREAM_CAPTION = 7  # separate from the frame (1) and augmentation (2) streams of sampling.py


class CaptionBank:
    def __init__(self, captions: dict[str, list[str]]):
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions.values())

    @classmethod
    def load(cls, root: str | os.PathLike, split: str) -> "CaptionBank":
        index = SplitIndex.load(root, split)
        captions: dict[str, list[str]] = {}
        for shard in index.shard_paths(root):
            samples = index_tar(shard)
            with open(shard, "rb") as f:
                for s in samples:
                    if "json" not in s.members:
                        continue
                    offset, size = s.members["json"]
                    f.seek(offset)
                    try:
                        meta = ClipMeta.from_json(f.read(size))
                    except (ValueError, TypeError):
                        continue  # the loader skips (and counts) such samples itself
                    captions[os.path.basename(s.key)] = [c for c in meta.captions if c and c.strip()]
        return cls(captions)

    def all(self, key: str) -> list[str]:
        return self.captions.get(key, [])

    def pick_one(self, key: str, epoch: int, seed: int = 0, mode: CaptionSampling = "cycle") -> str:
        """One caption of `key` for `epoch` ("" when the video has none)."""
        caps = self.captions.get(key, [])
        if not caps:
            return ""
        h = key_hash(key)
        if mode == "cycle":
            perm = np.random.default_rng([seed & 0xFFFFFFFF, _STREAM_CAPTION, h & 0xFFFFFFFF, h >> 32]).permutation(len(caps))
            return caps[int(perm[epoch % len(caps)])]
        if mode == "random":
            rng = np.random.default_rng([seed & 0xFFFFFFFF, _STREAM_CAPTION, epoch, h & 0xFFFFFFFF, h >> 32])
            return caps[int(rng.integers(len(caps)))]
        raise ValueError(f"caption sampling must be 'cycle' or 'random', got {mode!r}")

    def pick(self, keys: Sequence[str], epoch: int, seed: int = 0, mode: CaptionSampling = "cycle") -> list[str]:
        return [self.pick_one(k, epoch, seed, mode) for k in keys]

