"""The record every dataset parser produces, and the result of parsing one split."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class VideoRecord:
    """One source video (a file or a folder of frames) and its annotation.

    `path is None and frames_dir is None` means the video was listed but not found. A record with a
    `missing_reason` (not found, or a bad annotation) is rejected by the shard writer with that reason.
    """

    source_id: str
    path: Optional[str] = None  # a video file
    frames_dir: Optional[str] = None  # a folder of numbered frames (SSv1)
    frame_rate: Optional[float] = None  # native rate of a frame folder
    label: Optional[str] = None  # class name (recognition)
    label_index: Optional[int] = None
    captions: list[str] = field(default_factory=list)  # retrieval
    start: Optional[float] = None  # seconds into the source, for trimming a full video
    end: Optional[float] = None
    missing_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParsedSplit:
    dataset: str
    split: str
    classes: list[str]  # index -> name; empty for caption-only (retrieval) data
    records: list[VideoRecord]
    warnings: list[str] = field(default_factory=list)  # printed by the CLI (e.g. an empty class folder)


def time_range_problem(start: Optional[float], end: Optional[float]) -> Optional[str]:
    """Why [start, end) seconds is not a usable time range (None: it is, or no range was given)."""
    for name, value in (("start", start), ("end", end)):
        if value is not None and not math.isfinite(value):
            return f"bad time range: {name} {value} is not a finite number"
    if start is not None and start < 0:
        return f"bad time range: start {start:g} s is negative"
    if end is not None and end <= (start or 0.0):
        return f"bad time range: end {end:g} s is not after start {start or 0.0:g} s"
    return None
