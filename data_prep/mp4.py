"""In-memory `+faststart` for MP4 (moov atom before mdat), like ffmpeg's `-movflags +faststart`.

FFmpeg's own faststart re-opens the output by file name, which a BytesIO does not have, so the
encoder writes a normal MP4 and this moves the `moov` box in front and shifts the chunk offsets.
"""
from __future__ import annotations

import struct

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"udta", b"mvex"}


def _boxes(data: bytes, start: int, end: int):
    """Yield (type, box start, payload start, box end) for the boxes in data[start:end]."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"malformed MP4: box {kind!r} at {pos} has size {size}")
        yield kind, pos, pos + header, pos + size
        pos += size


def _shift_offsets(moov: bytearray, start: int, end: int, delta: int) -> None:
    for kind, _, payload, box_end in _boxes(moov, start, end):
        if kind in _CONTAINERS:
            _shift_offsets(moov, payload, box_end, delta)
        elif kind in (b"stco", b"co64"):
            (count,) = struct.unpack_from(">I", moov, payload + 4)
            fmt, width = (">I", 4) if kind == b"stco" else (">Q", 8)
            for i in range(count):
                at = payload + 8 + i * width
                value = struct.unpack_from(fmt, moov, at)[0] + delta
                if kind == b"stco" and value >= 1 << 32:
                    raise ValueError("MP4 faststart: chunk offset overflows stco; file too large for in-memory faststart")
                struct.pack_into(fmt, moov, at, value)


def faststart(data: bytes) -> bytes:
    """Return `data` with its `moov` box moved before the first `mdat` box (a no-op if it already is)."""
    boxes = list(_boxes(data, 0, len(data)))
    kinds = [b[0] for b in boxes]
    if b"moov" not in kinds or b"mdat" not in kinds:
        raise ValueError("not an MP4 with moov and mdat boxes")
    i_moov, i_mdat = kinds.index(b"moov"), kinds.index(b"mdat")
    if i_moov < i_mdat:
        return data
    _, m_start, _, m_end = boxes[i_moov]
    moov = bytearray(data[m_start:m_end])
    _shift_offsets(moov, boxes[i_moov][2] - m_start, len(moov), len(moov))
    head = b"".join(data[b[1]:b[3]] for b in boxes[:i_mdat])
    tail = b"".join(data[b[1]:b[3]] for j, b in enumerate(boxes) if j >= i_mdat and j != i_moov)
    return head + bytes(moov) + tail


def box_order(data: bytes) -> list[str]:
    """Top-level box types, in file order (for tests and checks)."""
    return [b[0].decode("latin-1") for b in _boxes(data, 0, len(data))]
