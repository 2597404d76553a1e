"""Random access to samples inside tar shards (no WebDataset or DALI types).

A shard's member table comes from its DALI `.idx` file when present (one small read), otherwise
from a scan of the tar headers. Samples are then read with one seek + read per member, so a rank
or a resumed run can start anywhere in a shard. Broken samples raise `SampleError`, which the
loaders count as skipped; a truncated tar yields the samples before the cut.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from s4v.data.format import ClipMeta
from s4v.data.shards import ShardTable

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi")


class SampleError(Exception):
    """A sample that cannot be delivered (missing/truncated member, bad label, undecodable video)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


@dataclass
class TarSample:
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size) in bytes


@dataclass
class RawSample:
    key: str
    video: bytes  # the encoded clip
    label: int  # class index, -1 when the sample has no `.cls`
    frames: int  # frames in the clip
    height: int
    width: int


def _split_name(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    key, _, ext = base.partition(".")
    return os.path.join(os.path.dirname(name), key) if os.path.dirname(name) else key, ext


def _group(entries: list[tuple[str, int, int]]) -> list[TarSample]:
    """Group (member name, offset, size) into samples by key, keeping tar order."""
    out: list[TarSample] = []
    for name, offset, size in entries:
        key, ext = _split_name(name)
        if not out or out[-1].key != key:
            out.append(TarSample(key, {}))
        out[-1].members[ext] = (offset, size)
    return out


def _parse_idx(path: Path) -> list[tuple[str, int, int]]:
    lines = path.read_text().split("\n")
    if not lines or not lines[0].startswith("v1."):
        raise ValueError(f"{path}: not a DALI wds2idx file")
    entries = []
    for line in lines[1:]:
        tok = line.split()
        for i in range(0, len(tok) - 3, 4):  # ext offset size name
            entries.append((tok[i + 3], int(tok[i + 1]), int(tok[i + 2])))
    return entries


def _scan_tar(path: Path) -> list[tuple[str, int, int]]:
    entries = []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isfile():
                    entries.append((m.name, m.offset_data, m.size))
    except (tarfile.ReadError, EOFError, OSError):
        pass  # truncated or damaged: keep the members read so far
    return entries


_INDEX_CACHE: dict[str, list[TarSample]] = {}


def index_tar(path: str | os.PathLike) -> list[TarSample]:
    """The samples of one tar shard, in tar order (cached per process)."""
    p = Path(path)
    cached = _INDEX_CACHE.get(str(p))
    if cached is None:
        idx = p.with_suffix(".idx")
        entries = _parse_idx(idx) if idx.is_file() else _scan_tar(p)
        cached = _INDEX_CACHE[str(p)] = _group(entries)
    return cached


class ShardReader:
    """Reads samples by global id (see shards.ShardTable); one open file per shard, per process."""

    def __init__(self, root: str | os.PathLike, table: ShardTable):
        self.root, self.table = Path(root), table
        self._files: dict[str, io.BufferedReader] = {}
        self._pid = os.getpid()

    def _file(self, name: str):
        if self._pid != os.getpid():  # forked into a worker: never share file offsets
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(name)
        if f is None:
            if len(self._files) >= 8:
                self._files.pop(next(iter(self._files))).close()
            f = self._files[name] = open(self.root / name, "rb")
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def _member(self, name: str, key: str, members: dict, ext: str) -> Optional[bytes]:
        if ext not in members:
            return None
        offset, size = members[ext]
        f = self._file(name)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise SampleError(key, f"truncated member {key}.{ext} in {name} ({len(data)} of {size} bytes)")
        return data

    def read(self, gid: int) -> RawSample:
        shard, ordinal = self.table.locate(gid)
        name = self.table.names[shard]
        samples = index_tar(self.root / name)
        if ordinal >= len(samples):
            raise SampleError(f"{name}#{ordinal}", f"sample {ordinal} missing from {name} "
                              f"(tar holds {len(samples)}, index says {self.table.counts[shard]}; truncated shard?)")
        s = samples[ordinal]
        key = os.path.basename(s.key)
        video = None
        for ext in VIDEO_EXTS:
            video = self._member(name, key, s.members, ext)
            if video is not None:
                break
        if not video:
            raise SampleError(key, f"no video member in {name}")
        cls = self._member(name, key, s.members, "cls")
        try:
            label = int(cls.decode().strip()) if cls is not None else -1
        except (UnicodeDecodeError, ValueError):
            raise SampleError(key, f"bad .cls {cls[:20]!r}") from None
        frames = height = width = 0
        raw_meta = self._member(name, key, s.members, "json")
        if raw_meta is not None:
            try:
                meta = ClipMeta.from_json(raw_meta)
                frames, height, width = int(meta.frames), int(meta.height), int(meta.width)
            except (ValueError, TypeError, json.JSONDecodeError) as e:
                raise SampleError(key, f"bad .json: {e}") from None
        if frames <= 0 or height <= 0 or width <= 0:
            frames, height, width = probe_video(key, video)
        return RawSample(key, video, label, frames, height, width)


def probe_video(key: str, data: bytes) -> tuple[int, int, int]:
    """(frames, height, width) from the container, for samples without usable metadata."""
    import av

    try:
        with av.open(io.BytesIO(data)) as c:
            st = c.streams.video[0]
            n = st.frames or sum(1 for p in c.demux(st) if p.size)
            return int(n), int(st.codec_context.height), int(st.codec_context.width)
    except (av.error.FFmpegError, IndexError) as e:
        raise SampleError(key, f"unreadable video: {e}") from None
