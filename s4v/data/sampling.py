"""Frame-index sampling and test-time crop boxes (pure numpy; no decoder).

Both loaders call these functions with the same `rng` (see `sample_rng`), so for a given
(seed, epoch, key) they decode exactly the same frames. Conventions, from the Side4Video code
(docs/method.md 6.1 and 7), with n = frames in the video and T = frames per clip:

- `segment` (TSN, Something-Something): segment boundaries `i*n//T`; train picks a random
  frame inside each segment, test the segment middle. Videos with n <= T: every frame once plus
  random repeats, sorted (train) or `i*n//T` (test).
- `uniform` (Kinetics-400): seg = (n-1)/T; train picks a random integer in
  [round(seg*i), round(seg*(i+1))]; test clips start at `linspace(0, n/T-1, K)` with stride n/T.
- `linspace` (test only, retrieval on MSR-VTT/MSVD): `linspace(0, n-1, T)` truncated to integers.
- Multi-clip test for `segment`: clip k of K takes `round(seg*i) + int(seg/(K+1)*(k+1))` with
  seg = (n-1)/T. A single test clip uses the segment middles (the per-epoch validation rule).
"""
from __future__ import annotations

import hashlib

import numpy as np

# Separate random streams per purpose, so e.g. enabling RandAugment does not move the frames.
STREAM_FRAMES, STREAM_AUG = 1, 2


def key_hash(key: str) -> int:
    """Stable 64-bit hash of a sample key (Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def sample_rng(seed: int, epoch: int, key: str, stream: int, view: int = 0) -> np.random.Generator:
    """The generator for one (seed, epoch, sample, purpose, view): identical in every process."""
    h = key_hash(key)
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, h & 0xFFFFFFFF, h >> 32, stream, view])


def _check(n: int, t: int) -> None:
    if n < 1:
        raise ValueError(f"cannot sample from a video with {n} frames")
    if t < 1:
        raise ValueError(f"num_frames must be >= 1, got {t}")


def segment_train_indices(n: int, t: int, rng: np.random.Generator) -> np.ndarray:
    """TSN training indices: one random frame per segment [i*n//T, (i+1)*n//T)."""
    _check(n, t)
    if n <= t:
        extra = rng.integers(0, n, size=t - n)
        return np.sort(np.concatenate([np.arange(n), extra])).astype(np.int64)
    ticks = [i * n // t for i in range(t + 1)]
    return np.array([ticks[i] + int(rng.integers(0, ticks[i + 1] - ticks[i])) for i in range(t)], np.int64)


def segment_test_indices(n: int, t: int) -> np.ndarray:
    """TSN validation indices: the middle of each segment."""
    _check(n, t)
    if t == 1:
        return np.array([n // 2], np.int64)
    if n <= t:
        return np.array([i * n // t for i in range(t)], np.int64)
    offset = (n / t - 1) / 2.0
    return np.array([int(i * n / t + offset) for i in range(t)], np.int64)


def segment_multiclip_indices(n: int, t: int, clips: int) -> np.ndarray:
    """[clips, T] test indices for Something-Something multi-clip evaluation."""
    _check(n, t)
    seg = (n - 1) / t
    out = [[min(n - 1, round(seg * i) + int(seg / (clips + 1) * (k + 1))) for i in range(t)] for k in range(clips)]
    return np.array(out, np.int64)


def uniform_train_indices(n: int, t: int, rng: np.random.Generator) -> np.ndarray:
    """Kinetics-400 training indices: a random integer in [round(seg*i), round(seg*(i+1))]."""
    _check(n, t)
    seg = (n - 1) / t
    return np.array([int(rng.integers(round(seg * i), round(seg * (i + 1)) + 1)) for i in range(t)], np.int64)


def uniform_test_indices(n: int, t: int, clips: int) -> np.ndarray:
    """[clips, T] Kinetics-400 test indices: starts linspace(0, n/T-1, K), stride n/T."""
    _check(n, t)
    stride = n / t
    starts = np.linspace(0, max(stride - 1, 0), clips)
    out = [[min(n - 1, int(s + stride * i)) for i in range(t)] for s in starts]
    return np.array(out, np.int64)


def linspace_test_indices(n: int, t: int) -> np.ndarray:
    """T indices evenly over the whole video, first and last frame included, truncated to integers
    (CLIP4Clip's `slice_framepos 2`, the MSR-VTT/MSVD test rule; repeats when n < T)."""
    _check(n, t)
    return np.linspace(0, n - 1, num=t).astype(np.int64)


def clip_indices(mode: str, n: int, t: int, train: bool, clips: int = 1,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """[clips, T] frame indices of one video (clips is 1 in training)."""
    if train:
        if rng is None:
            raise ValueError("training-mode sampling needs an rng")
        fn = segment_train_indices if mode == "segment" else uniform_train_indices
        return fn(n, t, rng)[None]
    if mode == "segment":
        return segment_test_indices(n, t)[None] if clips == 1 else segment_multiclip_indices(n, t, clips)
    if mode == "uniform":
        return uniform_test_indices(n, t, clips)
    if mode == "linspace":
        if clips != 1:
            raise ValueError(f"linspace sampling takes one test clip, got {clips}")
        return linspace_test_indices(n, t)[None]
    raise ValueError(f"unknown sampling mode {mode!r}")


# ----------------------------------------------------------------------------- spatial test crops


def eval_crop_boxes(height: int, width: int, size: int, crops: int) -> list[tuple[int, int, int, int]]:
    """Test crops as (y0, x0, y1, x1) pixel boxes of a `height` x `width` (already resized) frame.

    `crops == 3`: left/top, centre, right/bottom along the long side, centred on the short side;
    `crops == 1`: the centre crop. A frame smaller than `size` gives the largest box that fits.
    """
    ch, cw = min(size, height), min(size, width)
    y_c, x_c = (height - ch) // 2, (width - cw) // 2
    if crops == 1:
        starts = [(y_c, x_c)]
    elif crops == 3:
        if width >= height:
            starts = [(y_c, 0), (y_c, x_c), (y_c, width - cw)]
        else:
            starts = [(0, x_c), (y_c, x_c), (height - ch, x_c)]
    else:
        raise ValueError(f"test crops must be 1 or 3, got {crops}")
    return [(y, x, y + ch, x + cw) for y, x in starts]
