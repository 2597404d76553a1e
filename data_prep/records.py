"""The record every dataset parser produces, and the result of parsing one split."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class VideoRecord:
    """One source video (a file or a folder of frames) and its annotation.

    `path is None and frames_dir is None` means the video was listed but not found; the shard
    writer then rejects it with `missing_reason`.
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
