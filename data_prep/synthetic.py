"""`python -m data_prep.synthetic`: a moving-shapes video dataset whose labels depend on frame ORDER.

    python -m data_prep.synthetic --out DIR [--train 3000 --val 500 --size 32 --frames 8
                                             --codec h264|vp9 --task pair4|dir4 --seed 0]

Tasks (the demo trains `pair4`, see the README's demo section):

- `pair4` (default): two shapes, one moving horizontally and one vertically; the class is
  (horizontal direction, vertical direction). Every clip has one horizontal and one vertical
  streak, so neither a single frame nor the frame average tells the class; only the order does.
  Reversing a clip's frames gives a clip of the reverse class (left-up <-> right-down).
- `dir4`: one or two shapes all moving left/right/up/down. Easier, but the frame average leaks the
  axis (an order-free model can reach 50 %, not 25 %).

The trajectory centre is uniform over the positions that keep the whole path in the frame, so the
data are symmetric under time reversal; shapes have soft anti-aliased edges and move by sub-pixel
amounts; each frame gets independent noise. Train clips use seed 1000+S, val clips seed 999 (the same
val set for every --seed). Clips are written through the same shard writer as real datasets.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from data_prep.records import VideoRecord
from data_prep.transcode import EncodeOptions, encode_frames
from data_prep.writer import Interrupted, ShardOptions, Summary, write_split

TASKS: dict[str, list[str]] = {
    "pair4": ["left_up", "left_down", "right_up", "right_down"],
    "dir4": ["left", "right", "up", "down"],
}
REVERSE: dict[str, dict[int, int]] = {"pair4": {0: 3, 1: 2, 2: 1, 3: 0}, "dir4": {0: 1, 1: 0, 2: 3, 3: 2}}
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1),
    "cyan": (0.1, 0.85, 0.9), "magenta": (0.9, 0.15, 0.85), "white": (0.97, 0.97, 0.97),
    "black": (0.03, 0.03, 0.03), "orange": (1.0, 0.55, 0.05),
}
VAL_SEED, TRAIN_SEED_BASE = 999, 1000
DEFAULT_CRF = {"h264": 18, "vp9": 24}  # tiny frames: keep the sub-pixel edges


@dataclass(frozen=True)
class Shape:
    kind: str  # square | disc
    color: str  # a PALETTE name
    half: float  # half size in pixels
    cx: float  # trajectory centre
    cy: float
    vx: float  # pixels per frame
    vy: float

    def caption(self) -> str:
        return f"a {self.color} {self.kind}"


@dataclass(frozen=True)
class ClipParams:
    task: str
    label: int
    size: int
    frames: int
    background: tuple[float, float, float]
    noise_std: float
    shapes: tuple[Shape, ...]  # in drawing order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipParams":
        return cls(**{**d, "background": tuple(d["background"]), "shapes": tuple(Shape(**s) for s in d["shapes"])})


def _direction_words(vx: float, vy: float) -> str:
    if vx:
        return "left" if vx < 0 else "right"
    return "up" if vy < 0 else "down"


def caption(p: ClipParams) -> str:
    if p.task == "pair4":
        moving = sorted(p.shapes, key=lambda s: s.vx == 0)  # horizontal mover first
        return " and ".join(f"{s.caption()} moves {_direction_words(s.vx, s.vy)}" for s in moving)
    names = " and ".join(s.caption() for s in p.shapes)
    verb = "moves" if len(p.shapes) == 1 else "move"
    return f"{names} {verb} {TASKS['dir4'][p.label]}"


def sample_params(rng: np.random.Generator, task: str, label: int, size: int, frames: int) -> ClipParams:
    """Random clip parameters of class `label`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {sorted(TASKS)}")
    scale = size / 32.0
    if task == "pair4":
        hsign, vsign = (-1.0 if label < 2 else 1.0), (-1.0 if label % 2 == 0 else 1.0)
        motions = [(hsign, 0.0), (0.0, vsign)]
    else:
        d = {0: (-1.0, 0.0), 1: (1.0, 0.0), 2: (0.0, -1.0), 3: (0.0, 1.0)}[label]
        motions = [d] * int(rng.integers(1, 3))
    colors = rng.choice(list(PALETTE), size=len(motions), replace=False)
    shapes = []
    for (dx, dy), color in zip(motions, colors):
        half = float(rng.uniform(2.0, 4.0)) * scale
        room = size - 2 * half  # the centre range of a still shape
        vmax = min(2.2 * scale, 0.6 * room / max(1, frames - 1))  # long clips: slower, still inside
        speed = float(rng.uniform(min(1.0 * scale, 0.5 * vmax), vmax))
        travel = speed * (frames - 1)
        # centre uniform over positions keeping the whole path inside: symmetric under time reversal
        along = float(rng.uniform(half + travel / 2, size - half - travel / 2))
        across = float(rng.uniform(half, size - half))
        cx, cy = (along, across) if dx else (across, along)
        shapes.append(Shape(str(rng.choice(["square", "disc"])), str(color), half, cx, cy, dx * speed, dy * speed))
    order = rng.permutation(len(shapes))
    shapes = [shapes[i] for i in order]
    while True:  # background colour with contrast to every shape
        bg = rng.uniform(0.0, 1.0, 3)
        if all(np.linalg.norm(bg - np.array(PALETTE[s.color])) > 0.45 for s in shapes):
            break
    return ClipParams(task, label, size, frames, tuple(float(c) for c in bg), float(rng.uniform(0.03, 0.12)),
                      tuple(shapes))


def reverse_params(p: ClipParams) -> ClipParams:
    """The same clip played backwards: velocities negated, reverse class."""
    shapes = tuple(Shape(s.kind, s.color, s.half, s.cx, s.cy, -s.vx, -s.vy) for s in p.shapes)
    return ClipParams(p.task, REVERSE[p.task][p.label], p.size, p.frames, p.background, p.noise_std, shapes)


def render(p: ClipParams) -> np.ndarray:
    """Noise-free frames, float32 [T, H, W, 3] in [0, 1]."""
    t = np.arange(p.frames, dtype=np.float64) - (p.frames - 1) / 2.0
    grid = np.arange(p.size, dtype=np.float64) + 0.5
    img = np.broadcast_to(np.asarray(p.background, np.float32), (p.frames, p.size, p.size, 3)).copy()
    for s in p.shapes:
        x = (s.cx + s.vx * t)[:, None, None]
        y = (s.cy + s.vy * t)[:, None, None]
        dx, dy = np.abs(grid[None, None, :] - x), np.abs(grid[None, :, None] - y)
        dist = np.maximum(dx, dy) if s.kind == "square" else np.sqrt(dx * dx + dy * dy)
        alpha = np.clip(s.half + 0.5 - dist, 0.0, 1.0).astype(np.float32)[..., None]  # soft edge, sub-pixel
        img = img * (1 - alpha) + np.asarray(PALETTE[s.color], np.float32) * alpha
    return img


def render_clip(p: ClipParams, noise_seed: int) -> np.ndarray:
    """Frames with independent per-frame noise, uint8 [T, H, W, 3]."""
    noise = np.random.default_rng(noise_seed).normal(0.0, p.noise_std, (p.frames, p.size, p.size, 3))
    return (np.clip(render(p) + noise.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class SyntheticProducer:
    """Shard-writer producer: renders a record's clip parameters and encodes them in memory."""

    opts: EncodeOptions
    fps: float

    def __call__(self, record: VideoRecord) -> bytes:
        p = ClipParams.from_dict(record.extra["params"])
        frames = render_clip(p, record.extra["noise_seed"])
        return encode_frames(list(frames), self.fps, self.opts, size=(p.size, p.size))


def make_records(split: str, n: int, task: str, size: int, frames: int, seed: int) -> list[VideoRecord]:
    """`n` clips with exactly balanced, randomly ordered classes; deterministic in (split seed, index)."""
    classes = TASKS[task]
    labels = np.random.default_rng([seed, 0]).permutation(np.arange(n) % len(classes))
    records = []
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        p = sample_params(rng, task, int(labels[i]), size, frames)
        records.append(VideoRecord(source_id=f"{task}-{split}-{i:06d}", label=classes[p.label], label_index=p.label,
                                   captions=[caption(p)],
                                   extra={"params": p.to_dict(), "noise_seed": int(rng.integers(2**63))}))
    return records


NVDEC_MIN_H264_WIDTH = 48  # smallest H.264 frame width NVDEC is believed to decode (48x16); unverified here


def generate(out: Path, train: int = 3000, val: int = 500, size: int = 32, frames: int = 8, codec: str = "h264",
             task: str = "pair4", seed: int = 0, fps: float = 8.0, shard_size: int = 250, workers: int = 1,
             crf: Optional[int] = None, progress: bool = True, overwrite: bool = False) -> list[Summary]:
    """Write the train and val splits (shards, .idx, split indices) into `out`.

    Every option that changes the clips is part of the writer's fingerprint (the clip parameters
    travel in each record), so a rerun with other options is refused unless `overwrite`.
    """
    if size % 2 or size < 16:
        raise ValueError(f"--size must be even and >= 16, got {size}")
    if frames < 3:
        raise ValueError(f"--frames must be >= 3 for any temporal signal, got {frames}")
    if codec == "h264" and size < NVDEC_MIN_H264_WIDTH:
        # Likely why DALI's GPU decoder skipped every 32 px demo clip on an H200 (reason not captured).
        print(f"note: {size}x{size} H.264 is below the smallest frame NVDEC is believed to decode "
              f"({NVDEC_MIN_H264_WIDTH} px wide); for DALI GPU decoding use --size {NVDEC_MIN_H264_WIDTH} or more. "
              "The CPU loaders read these clips fine.", file=sys.stderr)
    enc = EncodeOptions(codec=codec, fps=fps, short_side=0, gop=16, crf=crf if crf is not None else DEFAULT_CRF[codec])
    summaries = []
    for split, n, split_seed in (("train", train, TRAIN_SEED_BASE + seed), ("val", val, VAL_SEED)):
        if n <= 0:
            continue
        records = make_records(split, n, task, size, frames, split_seed)
        opts = ShardOptions(out=out, dataset=f"synthetic-{task}", split=split, classes=TASKS[task], codec=codec,
                            shard_size=shard_size, min_frames=frames, workers=workers, progress=progress,
                            overwrite=overwrite,
                            config={**asdict(enc), "fps_out": fps, "generator": "data_prep.synthetic v1"})
        summaries.append(write_split(records, SyntheticProducer(enc, fps), opts))
    return summaries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=3000, help="train clips")
    p.add_argument("--val", type=int, default=500, help="val clips")
    p.add_argument("--size", type=int, default=32, help="frame height and width")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (>= the frames a model samples)")
    p.add_argument("--codec", choices=["h264", "vp9"], default="h264")
    p.add_argument("--task", choices=sorted(TASKS), default="pair4")
    p.add_argument("--seed", type=int, default=0, help="train seed (val is fixed)")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--crf", type=int, help="quality (default 18 for h264, 24 for vp9)")
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="replace splits made with other options (written aside, swapped in when complete)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        summaries = generate(args.out, args.train, args.val, args.size, args.frames, args.codec, args.task, args.seed,
                             args.fps, args.shard_size, args.workers, args.crf, not args.no_progress, args.overwrite)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, Interrupted) else 2
    for s in summaries:
        print(s.text())
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
