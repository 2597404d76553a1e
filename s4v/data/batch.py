"""Engine-neutral batch preparation (host side) and assembly of decoded views into the batch dict.

Batch dict handed to the training loop (torch types only):
- train: `video` [B*R, T, 3, H, W] float32 (R = repeated_aug copies, sample-major: the R views of
  a video are adjacent), `label` [B*R] int64 (per view, after the flip label swap), `key` list of
  B*R str, `valid` [B*R] bool;
- eval: `video` [B, V, T, 3, H, W] with V = test_clips * test_crops (clip-major: view = clip *
  test_crops + crop), `label` [B], `key` [B], `valid` [B].
`valid` is False for eval padding and for samples that failed to read or decode; such slots hold
a copy of a valid sample of the same batch (label and key included), so the shapes never change.
A batch where nothing decoded holds zeros and `valid` all False.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from s4v.data.augment import SamplePlan, num_views, plan_sample
from s4v.data.config import DataConfig
from s4v.data.reader import RawSample, SampleError, ShardReader
from s4v.data.shards import PAD

log = logging.getLogger("s4v.data")


@dataclass
class HostBatch:
    index: int  # batch index within the epoch
    slots: list[Optional[tuple[RawSample, SamplePlan]]]  # None: padding or failed to read
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)


def prepare_batch(cfg: DataConfig, reader: ShardReader, index: int, gids: Sequence[int], train: bool,
                  epoch: int) -> HostBatch:
    """Read the samples of one batch and plan their frames and augmentation."""
    hb = HostBatch(index, [])
    for gid in gids:
        if gid == PAD:
            hb.slots.append(None)
            continue
        try:
            raw = reader.read(int(gid))
            check_label(cfg, raw)
            plan = plan_sample(cfg, raw.key, raw.label, raw.frames, raw.height, raw.width, train, epoch)
        except SampleError as e:
            hb.skipped.append((e.key, e.reason))
            hb.slots.append(None)
            continue
        hb.slots.append((raw, plan))
    return hb


def check_label(cfg: DataConfig, raw: RawSample) -> None:
    """A label outside [0, cfg.num_classes) is a broken sample (skipped and counted), never a wrong
    class or a crash of the loss; no check when `num_classes` is None (retrieval, label-free data)."""
    n = cfg.num_classes
    if n is not None and not 0 <= raw.label < n:
        hint = "no .cls member, or " if raw.label == -1 else ""
        raise SampleError(raw.key, f"label {raw.label} outside [0, {n}) ({hint}wrong class list or "
                                   f"model.num_classes={n}?)")


def assemble(cfg: DataConfig, train: bool, slots: list[Optional[tuple[RawSample, SamplePlan]]],
             views: list[Optional[torch.Tensor]]) -> dict:
    """Stack per-sample view tensors ([V, T, 3, H, W] or None) into the batch dict (module doc)."""
    v = num_views(cfg, train)
    ok = [i for i, t in enumerate(views) if t is not None]
    shape = (v, cfg.num_frames, 3, cfg.image_size, cfg.image_size)
    ref = views[ok[0]] if ok else None
    videos, labels, keys, valid = [], [], [], []
    for i, t in enumerate(views):
        src = i if t is not None else (ok[0] if ok else None)
        if src is None:
            videos.append(torch.zeros(shape) if ref is None else ref.new_zeros(shape))
            labels.append([0] * v)
            keys.append("")
        else:
            _, plan = slots[src]
            videos.append(views[src])
            labels.append([vw.label for vw in plan.views])
            keys.append(plan.key)
        valid.append(t is not None)
    video = torch.stack(videos)
    if train:
        return {"video": video.flatten(0, 1),
                "label": torch.tensor(np.asarray(labels).reshape(-1), dtype=torch.int64),
                "key": [k for k in keys for _ in range(v)],
                "valid": torch.tensor(valid, dtype=torch.bool).repeat_interleave(v)}
    return {"video": video, "label": torch.tensor([lab[0] for lab in labels], dtype=torch.int64),
            "key": keys, "valid": torch.tensor(valid, dtype=torch.bool)}
