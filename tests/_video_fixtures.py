"""Tiny synthetic video shards for the loader tests (PyAV + tarfile; no data_prep dependency).

Frame i of every clip is a solid grey level `level(i)` (or a horizontal ramp offset by it), so a
decoded, normalised frame tells which source frame it came from, robustly to codec loss.
"""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import av
import numpy as np

from s4v.data.format import SHARD_PATTERN, ClipMeta, ShardInfo, SplitIndex

STEP, BASE = 9, 16  # grey level of frame i: BASE + STEP * i (i < 26)
CODECS = {"h264": ("libx264", {"preset": "ultrafast", "crf": "12", "bf": "0", "g": "4", "keyint_min": "4"}),
          "vp9": ("libvpx-vp9", {"crf": "12", "b:v": "0", "deadline": "realtime", "cpu-used": "8", "g": "4"})}


def level(i: int) -> int:
    return BASE + STEP * i


def frame_index_of(mean_level: float) -> int:
    """Inverse of `level` for a decoded frame's mean grey value (0..255)."""
    return int(round((mean_level - BASE) / STEP))


def encode_clip(n: int, height: int = 48, width: int = 64, codec: str = "h264", pattern: str = "solid",
                fps: int = 25) -> bytes:
    name, opts = CODECS[codec]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        st = c.add_stream(name, rate=fps, options=dict(opts))
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.codec_context.gop_size = 4
        for i in range(n):
            if pattern == "solid":
                arr = np.full((height, width, 3), level(i), np.uint8)
            else:  # "ramp": a horizontal ramp (crop position / flip visible) plus the frame's level
                ramp = np.linspace(0, 120, width)[None, :, None]
                arr = np.clip(level(i) // 3 + ramp + np.zeros((height, 1, 3)), 0, 255).astype(np.uint8)
            for p in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    return buf.getvalue()


@dataclass
class Spec:
    key: str
    frames: int
    label: int
    height: int = 48
    width: int = 64
    codec: str = "h264"
    pattern: str = "solid"
    corrupt: Optional[str] = None  # None | "garbage" (bytes) | "truncate" (cut the mp4) | "badcls" | "nometa"


_CLIP_CACHE: dict[tuple, bytes] = {}


def _clip(s: Spec) -> bytes:
    k = (s.frames, s.height, s.width, s.codec, s.pattern)
    if k not in _CLIP_CACHE:
        _CLIP_CACHE[k] = encode_clip(s.frames, s.height, s.width, s.codec, s.pattern)
    return _CLIP_CACHE[k]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tf.addfile(info, io.BytesIO(data))


def write_split(root: Path, split: str, shards: list[list[Spec]], idx: bool = False,
                truncate_shard: Optional[tuple[int, str]] = None, classes: Optional[list[str]] = None) -> SplitIndex:
    """Write `{split}-NNNNNN.tar` shards (+ `.idx` via wds2idx if `idx`) and the split index (whose class
    list is `classes`, default 200 names c0..c199).

    `truncate_shard=(shard, key)` cuts that tar halfway through `key`'s video member, dropping
    everything after it (the split index still claims the full sample count).
    """
    root.mkdir(parents=True, exist_ok=True)
    infos = []
    for si, specs in enumerate(shards):
        name = SHARD_PATTERN.format(split=split, index=si)
        counts: dict[int, int] = {}
        with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tf:
            for s in specs:
                video = _clip(s)
                if s.corrupt == "garbage":
                    video = bytes(np.random.default_rng(1).integers(0, 256, len(video), dtype=np.uint8))
                elif s.corrupt == "truncate":
                    video = video[: len(video) // 3]
                _add(tf, f"{s.key}.mp4", video)
                _add(tf, f"{s.key}.cls", b"x7" if s.corrupt == "badcls" else str(s.label).encode())
                if s.corrupt != "nometa":
                    meta = ClipMeta(source_id=s.key, label=str(s.label), fps=25.0, frames=s.frames,
                                    duration=s.frames / 25, width=s.width, height=s.height, codec=s.codec)
                    _add(tf, f"{s.key}.json", meta.to_json())
                counts[s.label] = counts.get(s.label, 0) + 1
        if truncate_shard and truncate_shard[0] == si:
            with tarfile.open(root / name) as tf:
                m = tf.getmember(f"{truncate_shard[1]}.mp4")
            with open(root / name, "r+b") as f:
                f.truncate(m.offset_data + m.size // 2)
        if idx:
            subprocess.run([sys.executable, "-m", "wds2idx", str(root / name),
                            str((root / name).with_suffix(".idx"))], check=True, capture_output=True)
        infos.append(ShardInfo(name=name, samples=len(specs), duration=sum(s.frames for s in specs) / 25,
                               class_counts=counts))
    index = SplitIndex(dataset="synthetic", split=split, shards=infos,
                       classes=[f"c{i}" for i in range(200)] if classes is None else classes,
                       codec=shards[0][0].codec if shards and shards[0] else "h264")
    index.save(root)
    return index


def simple_split(root: Path, split: str, num_shards: int, per_shard: int, codec: str = "h264",
                 frames=(12, 16, 20, 24), idx: bool = False, label_base: int = 0) -> list[Spec]:
    """`num_shards` x `per_shard` clean clips with keys s{shard}_{i}; labels label_base + running number."""
    shards, allspecs = [], []
    for si in range(num_shards):
        specs = [Spec(f"s{si}_{i}", frames[(si * per_shard + i) % len(frames)], label_base + si * per_shard + i,
                      codec=codec) for i in range(per_shard)]
        shards.append(specs)
        allspecs += specs
    write_split(root, split, shards, idx=idx)
    return allspecs


def decoded_indices(video, cfg) -> np.ndarray:
    """Frame index of each frame of normalised `video` [..., T, 3, H, W] (solid-pattern clips)."""
    import torch

    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    pix = (video.float().cpu() * std + mean) * 255
    lv = pix.mean(dim=(-1, -2, -3))
    return np.vectorize(frame_index_of)(lv.numpy())
