"""Host-side augmentation plans (pure numpy): every random choice is made here, once per sample.

Both loaders execute a `SamplePlan` the same way: decode `frames` (all clips), optionally apply
the RandAugment ops of each view to the full-size frames, crop `box` (pixels of the frame resized
to `resized`) and resize it to `image_size`, flip, grayscale, normalise. DALI does the crop and
both resizes in one ROI resize (`roi()` maps the box back to source pixels); PyAV does the same
with the box rounded to whole source pixels. Because the choices are data, a rebuilt or resumed pipeline reproduces them.

RandAugment follows the official one (SlowFast/timm `rand_augment.py`, "rand-m7-n4-mstd0.5-inc1"):
n ops drawn with replacement, each applied with probability 0.5, the same op and magnitude on every
frame of a clip, magnitude m + N(0, mstd) clipped to [0, 10]. Differences (s4v runs DALI's op suite,
mirrored by the PyAV loader): no `Invert` and no `SolarizeAdd` (13 ops instead of 15); translation is
at most `data.rand_augment_translate` pixels (115 = 0.45 x 256) instead of 0.45 x the frame's own
width/height; posterize keeps 8..4 bits instead of 4..0; magnitudes are rounded to integer bins.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from s4v.data.config import DataConfig
from s4v.data.sampling import STREAM_AUG, STREAM_FRAMES, clip_indices, sample_rng, eval_crop_boxes

# The RandAugment op list, in the order of DALI's `get_rand_augment_suite(use_shape=False)`
# (dali_pipeline.py asserts the order). Ops marked True take a random sign.
RA_OPS: list[tuple[str, bool]] = [
    ("translate_x", True), ("translate_y", True), ("shear_x", True), ("shear_y", True), ("rotate", True),
    ("brightness", True), ("contrast", True), ("color", True), ("sharpness", True), ("posterize", False),
    ("solarize", False), ("equalize", False), ("auto_contrast", False), ("identity", False),
]
RA_BINS = 11  # timm magnitudes are on a 0..10 scale: bin b of 11 == timm magnitude b
RA_IDENTITY = [name for name, _ in RA_OPS].index("identity")
# The ops a RandAugment layer draws from: DALI's suite without identity (the official op list has none;
# identity only fills the slot of an op that is not applied, so both loaders keep n slots per view).
RA_CHOICES = [i for i in range(len(RA_OPS)) if i != RA_IDENTITY]


@dataclass(frozen=True)
class RandAugmentSpec:
    n: int  # ops drawn per clip
    m: int  # magnitude (0..10)
    mstd: float  # std of the per-op magnitude noise (timm `mstd`)
    p: float = 0.5  # probability that each drawn op is applied (timm / official: 0.5)


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """Parse a timm-style string such as "rand-m7-n4-mstd0.5-inc1" (optional "-p0.5": per-op probability)."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"rand_augment must start with 'rand-', got {spec!r}")
    n, m, mstd, p_apply = 2, 9, 0.0, 0.5
    for p in parts[1:]:
        mo = re.fullmatch(r"([a-z]+)([0-9.]+)", p)
        if not mo:
            raise ValueError(f"bad rand_augment part {p!r} in {spec!r}")
        k, v = mo.groups()
        if k == "m":
            m = int(float(v))
        elif k == "n":
            n = int(v)
        elif k == "mstd":
            mstd = float(v)
        elif k == "p":
            p_apply = float(v)
        elif k == "inc":
            pass  # DALI's suite is the monotonic ("increasing") one already
        else:
            raise ValueError(f"unsupported rand_augment option {k!r} in {spec!r}")
    if not 0 <= m < RA_BINS:
        raise ValueError(f"rand_augment magnitude must be in [0, {RA_BINS - 1}], got {m}")
    if not 0 <= p_apply <= 1:
        raise ValueError(f"rand_augment probability must be in [0, 1], got {p_apply}")
    return RandAugmentSpec(n, m, mstd, p_apply)


def rand_augment_ops(rng: np.random.Generator, ra: RandAugmentSpec) -> list[tuple[int, int]]:
    """One view's RandAugment layers as in timm's (and the official) RandAugment: `n` ops drawn with
    replacement, each applied with probability `p` at magnitude m + N(0, mstd) (clipped to the bins),
    geometric and enhance ops with a random sign. An op not applied is `identity`, so there are always
    `n` (op, bin) pairs; bin < 0 means negated (-bin - 1)."""
    ops = []
    for op in rng.choice(RA_CHOICES, size=ra.n):
        if rng.random() >= ra.p:
            ops.append((RA_IDENTITY, 0))
            continue
        mag = ra.m + (rng.normal(0.0, ra.mstd) if ra.mstd > 0 else 0.0)
        mag = int(np.clip(round(mag), 0, RA_BINS - 1))
        negate = RA_OPS[int(op)][1] and rng.random() < 0.5
        ops.append((int(op), -mag - 1 if negate else mag))  # -mag-1 keeps "-0" distinct
    return ops


@dataclass
class View:
    """One augmented clip of a sample: what the model sees as one input."""

    clip: int  # row of `SamplePlan.frames`
    box: tuple[float, float, float, float]  # (y0, x0, y1, x1) crop in resized-frame pixels
    flip: bool = False
    gray: bool = False
    label: int = 0  # after the flip label swap
    ra: list[tuple[int, int]] = field(default_factory=list)  # (op index into RA_OPS, magnitude bin); bin < 0 = negated


@dataclass
class SamplePlan:
    key: str
    label: int
    frames: np.ndarray  # [clips, T] int64 frame indices
    size: tuple[int, int]  # (H, W) of the source video
    resized: tuple[int, int]  # (H, W) after the resize step
    views: list[View]

    def roi(self, view: View) -> tuple[float, float, float, float]:
        """The view's crop box in source-video pixels (y0, x0, y1, x1)."""
        sy, sx = self.size[0] / self.resized[0], self.size[1] / self.resized[1]
        y0, x0, y1, x1 = view.box
        return (y0 * sy, x0 * sx, y1 * sy, x1 * sx)


def resized_size(cfg: DataConfig, height: int, width: int) -> tuple[int, int]:
    """(H, W) after the resize step (torchvision `Resize(short)` rounding for short_side)."""
    if cfg.resize_mode == "fixed":
        return int(cfg.resize_fixed[0]), int(cfg.resize_fixed[1])
    s = cfg.resize_short
    if height <= width:
        return s, int(s * width / height)
    return int(s * height / width), s


def random_resized_crop(rng: np.random.Generator, height: int, width: int, area: tuple[float, float],
                        ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """Inception crop (torchvision `RandomResizedCrop.get_params`) as a (y0, x0, y1, x1) box."""
    total = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = total * rng.uniform(area[0], area[1])
        ar = math.exp(rng.uniform(*log_r))
        w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return (y, x, y + h, x + w)
    in_ratio = width / height  # fallback: central crop at the clamped aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    y, x = (height - h) // 2, (width - w) // 2
    return (y, x, y + h, x + w)


def swap_table(pairs: list[list[int]]) -> dict[int, int]:
    table: dict[int, int] = {}
    for a, b in pairs:
        table[int(a)], table[int(b)] = int(b), int(a)
    return table


def num_views(cfg: DataConfig, train: bool) -> int:
    return cfg.repeated_aug if train else cfg.test_clips * cfg.test_crops


def plan_sample(cfg: DataConfig, key: str, label: int, num_frames: int, height: int, width: int,
                train: bool, epoch: int) -> SamplePlan:
    """All random choices for one sample: frame indices (shared by its views) and each view's augmentation."""
    resized = resized_size(cfg, height, width)
    rh, rw = resized
    if train:
        frames = clip_indices(cfg.sampling, num_frames, cfg.num_frames, True,
                              rng=sample_rng(cfg.seed, epoch, key, STREAM_FRAMES))
        swap = swap_table(cfg.flip_label_swap)
        ra = parse_rand_augment(cfg.rand_augment) if cfg.rand_augment else None
        views = []
        for r in range(cfg.repeated_aug):
            rng = sample_rng(cfg.seed, epoch, key, STREAM_AUG, r)
            box = random_resized_crop(rng, rh, rw, tuple(cfg.crop_area), tuple(cfg.crop_ratio))
            flip = bool(cfg.flip and rng.random() < cfg.flip_prob)
            gray = bool(rng.random() < cfg.grayscale_prob)
            ops = rand_augment_ops(rng, ra) if ra is not None else []
            views.append(View(0, tuple(float(v) for v in box), flip, gray,
                              swap.get(label, label) if flip else label, ops))
    else:
        frames = clip_indices(cfg.test_sampling or cfg.sampling, num_frames, cfg.num_frames, False,
                              clips=cfg.test_clips)
        boxes = eval_crop_boxes(rh, rw, cfg.image_size, cfg.test_crops)
        views = [View(k, tuple(float(v) for v in b), label=label)
                 for k in range(cfg.test_clips) for b in boxes]
    return SamplePlan(key, label, frames, (height, width), resized, views)
