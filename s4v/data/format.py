"""The s4v shard format, shared by `data_prep/`, the input pipelines and the tests.

A split is a folder of WebDataset tar shards `{split}-{n:06d}.tar`, each with a DALI index
`{split}-{n:06d}.idx`, plus `{split}-index.json` describing them. One sample per video:

- `KEY.mp4`: the clip (H.264 yuv420p by default, or VP9), constant frame rate, short closed GOPs,
  no B-frames, `+faststart`;
- `KEY.cls`: the class index as ASCII digits (recognition; absent for caption-only data);
- `KEY.json`: metadata (`label`, `source_id`, `fps`, `frames`, `duration`, `width`, `height`,
  `codec`, `captions` for retrieval).

Keys hold no dots (WebDataset splits a member name at its first dot).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from s4v.fileio import atomic_write_bytes

SHARD_PATTERN = "{split}-{index:06d}.tar"
INDEX_NAME = "{split}-index.json"
INDEX_VERSION = 1


def sample_key(source_id: str) -> str:
    """A WebDataset-safe key: no dots or path separators."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", source_id)
    if not key:
        raise ValueError(f"empty sample key for source id {source_id!r}")
    return key


@dataclass
class ClipMeta:
    source_id: str
    label: Optional[str] = None  # class name (recognition)
    fps: float = 0.0
    frames: int = 0
    duration: float = 0.0
    width: int = 0
    height: int = 0
    codec: str = ""
    captions: list[str] = field(default_factory=list)  # retrieval
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "ClipMeta":
        return cls(**json.loads(data))


@dataclass
class ShardInfo:
    name: str  # file name of the tar, relative to the index
    samples: int
    duration: float  # seconds of video
    class_counts: dict[int, int] = field(default_factory=dict)
    keys_sha1: str = ""  # sha1 over the sorted sample keys (dedup / resume checks)


@dataclass
class SplitIndex:
    dataset: str
    split: str
    classes: list[str]
    shards: list[ShardInfo]
    codec: str = "h264"
    version: int = INDEX_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def duration(self) -> float:
        return sum(s.duration for s in self.shards)

    def class_counts(self) -> dict[int, int]:
        total: dict[int, int] = {}
        for s in self.shards:
            for c, n in s.class_counts.items():
                total[int(c)] = total.get(int(c), 0) + n
        return total

    def shard_paths(self, root: str | os.PathLike) -> list[Path]:
        return [Path(root) / s.name for s in self.shards]

    def save(self, root: str | os.PathLike) -> Path:
        path = Path(root) / INDEX_NAME.format(split=self.split)
        data = asdict(self)
        data["num_samples"], data["duration"] = self.num_samples, self.duration
        data["class_counts"] = {str(k): v for k, v in sorted(self.class_counts().items())}
        atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())
        return path

    @classmethod
    def load(cls, root: str | os.PathLike, split: str) -> "SplitIndex":
        path = Path(root) / INDEX_NAME.format(split=split)
        if not path.is_file():
            raise FileNotFoundError(f"no shard index {path}; create shards with `python -m data_prep.shard`")
        data = json.loads(path.read_text())
        shards = [ShardInfo(**{**s, "class_counts": {int(k): v for k, v in s["class_counts"].items()}})
                  for s in data["shards"]]
        return cls(data["dataset"], data["split"], data["classes"], shards, data.get("codec", "h264"),
                   data.get("version", INDEX_VERSION))
