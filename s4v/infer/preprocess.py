"""`Preprocess`: a model's test protocol (frames, sampling, resize, crops, normalisation) as a callable
that turns a video file into the tensor the model takes.

The protocol is the `data.*` test fields of the experiment the model was trained with: read from a run
directory's `config.yaml`, from the `preprocess` entry that exports keep, or, for a model without
either, the defaults for its frame count, input size and tower (K400 protocol: short side resized to
image_size * 256/224, one centre crop, one clip, the tower family's mean/std).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import torch

from s4v.data.config import CLIP_MEAN, CLIP_STD, DataConfig

from .video_file import VideoClip, read_clip

# The DataConfig fields that make up the test protocol (what exports store as `preprocess`).
PROTOCOL_FIELDS = ("num_frames", "sampling", "test_sampling", "image_size", "resize_mode", "resize_short",
                   "resize_fixed", "mean", "std", "test_crops", "test_clips")


class Preprocess:
    """`preprocess(path)` -> `[V, T, 3, S, S]` float32 (V = crops x clips test views; feed it to the model
    as a batch and average the views' softmax scores). `preprocess.read(path)` also says which frames
    were used. Raises `VideoReadError` for a file that yields no video."""

    def __init__(self, data: DataConfig):
        data.validate()
        self.data = data

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        return self.read(path).video

    def read(self, path: str | os.PathLike, threads: int = 0) -> VideoClip:
        return read_clip(path, self.data, threads)

    @property
    def views(self) -> int:
        return self.data.test_crops * self.data.test_clips

    def with_views(self, crops: int, clips: int) -> "Preprocess":
        """The same protocol with `crops` spatial crops (1 or 3) x `clips` temporal clips."""
        return Preprocess(dataclasses.replace(self.data, test_crops=crops, test_clips=clips))

    def to_dict(self) -> dict[str, Any]:
        return protocol_dict(self.data)

    def __repr__(self) -> str:
        return f"Preprocess({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


def protocol_dict(data: DataConfig) -> dict[str, Any]:
    """The test-protocol fields of a DataConfig, as plain values (stored in exports)."""
    out = {}
    for name in PROTOCOL_FIELDS:
        value = getattr(data, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def from_dict(protocol: dict[str, Any]) -> Preprocess:
    known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in protocol.items() if k in PROTOCOL_FIELDS}
    return Preprocess(DataConfig(**known))


def default_preprocess(num_frames: int, image_size: int, retrieval: bool = False,
                       mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Preprocess:
    """The protocol for a model that stores none: short side to image_size * 256/224, centre crop, one
    clip, normalised with `mean`/`std` (the tower's); recognition samples frames with the K400 `uniform`
    rule, retrieval evenly over the whole video (`linspace`, as MSR-VTT/MSVD testing)."""
    return Preprocess(DataConfig(num_frames=num_frames, image_size=image_size,
                                 resize_short=round(image_size * 256 / 224), mean=tuple(mean), std=tuple(std),
                                 test_sampling="linspace" if retrieval else None))


def preprocess_for(model, protocol: Optional[dict[str, Any]] = None) -> Preprocess:
    """The model's preprocess: `protocol` (stored with it) if given, else the defaults for its size and
    tower. The frame count always follows the model (a protocol saying otherwise would not fit it)."""
    from s4v.model.retrieval import Side4VideoRetrieval
    from s4v.model.towers import family_info

    size = model.spec.backbone.image_size
    if protocol:
        pre = from_dict(protocol)
        if pre.data.num_frames != model.num_frames or pre.data.image_size != size:
            pre = Preprocess(dataclasses.replace(pre.data, num_frames=model.num_frames, image_size=size))
        return pre
    family = family_info(model.spec.backbone.family)  # the tower only works on inputs normalised as trained
    return default_preprocess(model.num_frames, size, isinstance(model, Side4VideoRetrieval), family.mean, family.std)


def read_video(path: str | os.PathLike, num_frames: int = 8, image_size: int = 224, *, crops: int = 1,
               clips: int = 1, sampling: str = "uniform", resize_short: Optional[int] = None,
               resize: Optional[Sequence[int]] = None, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Read a video file as the model's input `[V, T, 3, image_size, image_size]` (V = crops x clips).

    Args:
        path: any video file FFmpeg decodes; rotation metadata is applied, audio ignored.
        num_frames: T, frames per clip (the model's `num_frames`).
        image_size: the model's input size (`model.spec.backbone.image_size`).
        crops: 1 (centre) or 3 (both ends and centre of the long side).
        clips: temporal clips.
        sampling: "uniform" (Kinetics), "segment" (TSN, Something-Something) or "linspace" (retrieval).
        resize_short: short side before cropping (default image_size * 256/224); or
        resize: a fixed (H, W) before cropping (the Something-Something recipes: (256, 320)).
        mean, std: per-channel normalisation on the 0..1 scale (default CLIP's).

    `s4v.load(...)` returns the trained model's own protocol as a callable; prefer it for a trained model.
    """
    data = DataConfig(num_frames=num_frames, image_size=image_size, test_crops=crops, test_clips=clips,
                      sampling="uniform" if sampling == "linspace" else sampling,
                      test_sampling="linspace" if sampling == "linspace" else None,
                      resize_short=resize_short or round(image_size * 256 / 224),
                      resize_mode="fixed" if resize else "short_side", mean=tuple(mean), std=tuple(std))
    if resize:
        data.resize_fixed = (int(resize[0]), int(resize[1]))
    return Preprocess(data)(path)
