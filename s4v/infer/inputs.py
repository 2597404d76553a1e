"""VIDEO_OR_DIR arguments -> the list of files to read, and the per-file reading done in DataLoader workers."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .preprocess import Preprocess
from .video_file import VideoReadError

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".webm", ".mkv", ".avi", ".mov", ".mpg", ".mpeg", ".flv", ".wmv",
                              ".3gp", ".ts", ".mts", ".m2ts", ".ogv", ".gif"})


class InputError(ValueError):
    """Arguments that name no video to read at all (e.g. a folder without videos)."""


def collect_videos(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Files named directly are taken whatever their extension (a missing or unreadable one becomes an
    error line, not a failure); folders are searched recursively for video extensions, sorted. A folder
    without any video is an InputError."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*") if f.suffix.lower() in VIDEO_EXTENSIONS and f.is_file())
            if not found:
                raise InputError(f"{path}: no video files in this folder (extensions: "
                                 f"{', '.join(sorted(VIDEO_EXTENSIONS))})")
            out += found
        else:
            out.append(str(path))
    if not out:
        raise InputError("no videos given")
    return out


def disjoint_part(files: list[str], rank: int, world_size: int) -> list[str]:
    """Rank `rank`'s share: every `world_size`-th file, so ranks never overlap and together cover all."""
    return files[rank::world_size]


class _Files(Dataset):
    def __init__(self, files: list[str], preprocess: Preprocess, threads: int):
        self.files, self.preprocess, self.threads = files, preprocess, threads

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        try:
            clip = self.preprocess.read(path, self.threads)
        except VideoReadError as err:
            return {"index": i, "path": path, "error": err.reason}
        except Exception as err:  # noqa: BLE001 - anything else a broken file provokes: one line, never the run
            return {"index": i, "path": path, "error": f"{type(err).__name__}: {err}"}
        return {"index": i, "path": path, "video": clip.video, "frames": clip.frames.tolist(),
                "num_frames": clip.num_frames, "rotation": clip.rotation}


def read_videos(files: list[str], preprocess: Preprocess, workers: int = 2):
    """Yield one dict per file, in order: `video` [V, T, 3, S, S], `frames`, `num_frames`, or `error`.
    Decoding runs in `workers` processes (0: in this one)."""
    threads = 1 if workers else 0  # parallelism from the workers, or FFmpeg's own threads
    loader = DataLoader(_Files(files, preprocess, threads), batch_size=None, num_workers=workers,
                        worker_init_fn=_quiet_worker if workers else None,
                        prefetch_factor=4 if workers else None)
    yield from loader


def _quiet_worker(worker_id: int) -> None:
    torch.set_num_threads(1)
    quiet_ffmpeg()


def quiet_ffmpeg() -> None:
    """FFmpeg's own warnings (e.g. swscale's "No accelerated colorspace conversion") off the terminal;
    real failures still surface as exceptions, reported per file."""
    import av.logging

    av.logging.set_level(av.logging.PANIC)


def batches(items, batch_size: int):
    """Group readable items into lists of at most `batch_size`; unreadable ones pass through alone
    (as soon as seen, keeping the order of the lines)."""
    group: list[dict] = []
    for item in items:
        if "error" in item:
            if group:
                yield group
                group = []
            yield [item]
            continue
        group.append(item)
        if len(group) == batch_size:
            yield group
            group = []
    if group:
        yield group


def stack_views(group: list[dict], device: Optional[torch.device] = None) -> torch.Tensor:
    """`[B*V, T, 3, S, S]` of a group of readable items (video-major: a video's V views are adjacent)."""
    video = torch.cat([g["video"] for g in group])
    return video.to(device, non_blocking=True) if device is not None else video
