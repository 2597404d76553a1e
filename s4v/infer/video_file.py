"""One video file on disk -> the model's input `[V, T, 3, S, S]`, by the model's test protocol.

Any container and codec FFmpeg decodes (mp4, webm, mkv, avi, mov; H.264, HEVC, VP9, MPEG-4, ...), read
in place with PyAV. Frame i is the i-th frame in presentation order, so variable frame rates need no
timestamps arithmetic; audio and other streams are ignored. A display matrix (phones store portrait
videos turned and say so in a rotation matrix) is applied, so the model sees the video the right way up.

Frames and crops are planned by `s4v.data.augment.plan_sample` (test mode) and rendered with the PyAV
loader's own resize and normalisation, so a file gives the same tensor as the same clip read from a
shard by `s4v eval` (data.loader=pyav). Unlike that loader, decoding never seeks: it runs from the
start to the last frame needed, which is exact for every container (AVI indexes and B-frames included).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import av
import numpy as np
import torch

from s4v.data.augment import SamplePlan, plan_sample
from s4v.data.config import DataConfig
from s4v.data.pyav_loader import render_views  # the eval loader's own pixel arithmetic


class VideoReadError(Exception):
    """A file that yields no video: missing, not a video, no video stream, no frames, undecodable."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass
class VideoClip:
    path: str
    video: torch.Tensor  # [V, T, 3, S, S] float32, normalised; V = test_clips * test_crops (clip-major)
    frames: np.ndarray  # [clips, T] indices of the frames used (0-based, presentation order)
    num_frames: int  # frames in the file
    size: tuple[int, int]  # (H, W) as displayed (after the rotation)
    rotation: int  # degrees counter-clockwise applied to the stored pixels (0, 90, 180, 270)


def _open(path: str):
    if not os.path.exists(path):
        raise VideoReadError(path, "no such file")
    if os.path.isdir(path):
        raise VideoReadError(path, "is a directory")
    try:
        container = av.open(path)
    except av.error.FFmpegError as err:
        raise VideoReadError(path, f"not a readable video ({err.strerror or err})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(path, "no video stream")
    return container


def count_frames(path: str) -> tuple[int, int, int]:
    """(frames, stored height, stored width): a demux pass over the video stream, no decoding. A file
    with fewer frames than its container's index lists (a cut mp4/mov) is a VideoReadError."""
    with _open(path) as c:
        st = c.streams.video[0]
        try:
            n = sum(1 for p in c.demux(st) if p.size)
        except av.error.FFmpegError as err:
            raise VideoReadError(path, f"damaged container ({err.strerror or err})") from None
        if "mp4" in c.format.name and st.frames and n < st.frames:  # mp4/mov index every frame: the rest is cut off
            raise VideoReadError(path, f"truncated: the container lists {st.frames} frames, the file holds {n}")
        return n, int(st.codec_context.height), int(st.codec_context.width)


def _display_plan(cfg: DataConfig, path: str, n: int, height: int, width: int, rotation: int) -> SamplePlan:
    if rotation % 180:
        height, width = width, height
    return plan_sample(cfg, path, 0, n, height, width, train=False, epoch=0)


def read_clip(path: str | os.PathLike, cfg: DataConfig, threads: int = 0) -> VideoClip:
    """Decode and render one file as `s4v eval` renders a test sample (`cfg`: the test protocol:
    num_frames, sampling / test_sampling, resize, image_size, mean/std, test_crops, test_clips).
    `threads`: FFmpeg decoding threads (0: FFmpeg's choice). Raises VideoReadError."""
    path = str(path)
    n, height, width = count_frames(path)
    if n == 0 or height <= 0 or width <= 0:
        raise VideoReadError(path, "no video frames" if n == 0 else f"bad frame size {width}x{height}")
    plan = _display_plan(cfg, path, n, height, width, 0)
    wanted = {int(i) for i in plan.frames.reshape(-1)}
    last = max(wanted)
    arrays: dict[int, np.ndarray] = {}
    rotation, k = 0, 0
    with _open(path) as c:
        st = c.streams.video[0]
        st.codec_context.thread_count = threads
        try:
            for i, frame in enumerate(c.decode(st)):
                if i == 0:
                    rotation = int(round(frame.rotation / 90.0)) * 90 % 360
                    k = rotation // 90
                    plan = _display_plan(cfg, path, n, height, width, rotation)  # same frames, display size
                if i in wanted:
                    arr = frame.to_ndarray(format="rgb24")  # stored size; displayed once turned by rotation
                    arrays[i] = np.ascontiguousarray(np.rot90(arr, k)) if k else arr
                if i >= last:
                    break
        except av.error.FFmpegError as err:
            raise VideoReadError(path, f"decode failed after {len(arrays)} frames ({err.strerror or err})") from None
    if not arrays:
        raise VideoReadError(path, "no frame could be decoded")
    decoded = max(arrays)
    frames = np.minimum(plan.frames, decoded)  # a stream shorter than its packets: repeat its last frame
    return VideoClip(path, render(cfg, plan, frames, arrays), frames, n, plan.size, rotation)


def render(cfg: DataConfig, plan: SamplePlan, frames: np.ndarray, arrays: dict[int, np.ndarray]) -> torch.Tensor:
    """The test views of `plan` from display-size RGB frames: crop, resize to image_size, normalise
    (s4v.data.pyav_loader.render_sample's path)."""
    return render_views(cfg, plan, arrays, frames)
