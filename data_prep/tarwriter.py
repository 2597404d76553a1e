"""Deterministic WebDataset tar writing plus the matching DALI index (`wds2idx` format v1.2).

Index format: a first line `v1.2 <num_samples>`, then one line per sample listing, for each of its
files in tar order, `ext offset size name` (offset = where the file's data starts in the tar).
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Sequence

IDX_VERSION = "v1.2"
BLOCK = 512


def member_bytes(files: Sequence[tuple[str, bytes]]) -> int:
    """Bytes a sample takes in a tar: one header block per file plus data padded to 512."""
    return sum(BLOCK + -(-len(data) // BLOCK) * BLOCK for _, data in files)


@dataclass
class TarSampleWriter:
    """Writes samples `KEY.ext` into an open binary file; fixed metadata makes the bytes reproducible."""

    fileobj: BinaryIO
    idx_lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tar = tarfile.open(fileobj=self.fileobj, mode="w", format=tarfile.USTAR_FORMAT)

    @property
    def offset(self) -> int:
        return self.tar.offset

    def add(self, key: str, files: Sequence[tuple[str, bytes]]) -> None:
        parts = []
        for ext, data in files:
            name = f"{key}.{ext}"
            if len(name.encode()) > 99:
                raise ValueError(f"tar member name too long for ustar: {name!r}")
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            data_offset = self.tar.offset + BLOCK  # ustar: exactly one header block
            self.tar.addfile(info, io.BytesIO(data))
            parts.append(f"{ext} {data_offset} {len(data)} {name}")
        self.idx_lines.append(" ".join(parts))

    def close(self) -> None:
        self.tar.close()  # end-of-archive blocks; the caller owns and closes fileobj

    def index_text(self) -> str:
        return f"{IDX_VERSION} {len(self.idx_lines)}\n" + "".join(line + "\n" for line in self.idx_lines)

