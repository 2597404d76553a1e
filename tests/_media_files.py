"""Raw video files of common containers and codecs, written with PyAV, for the inference tests.

Frame i shows grey level `level(i)` (tests/_video_fixtures.py) in its top half and black below, so a
decoded frame tells its source index and, after a rotation, which way up it was shown.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from tests._video_fixtures import level

# (container, codec, encoder options); HEVC only where the bundled FFmpeg has an encoder for it.
FORMATS = {
    "mp4_h264": ("mp4", "libx264", {"preset": "ultrafast", "crf": "10", "g": "4"}),
    "webm_vp9": ("webm", "libvpx-vp9", {"crf": "10", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}),
    "mkv_hevc": ("matroska", "libx265", {"preset": "ultrafast", "crf": "10", "x265-params": "log-level=error"}),
    "avi_mpeg4": ("avi", "mpeg4", {"qscale": "2", "bf": "2"}),
    "mov_h264": ("mov", "libx264", {"preset": "ultrafast", "crf": "10"}),
}
EXTENSIONS = {"mp4": "mp4", "webm": "webm", "matroska": "mkv", "avi": "avi", "mov": "mov"}


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:  # noqa: BLE001 - UnknownCodecError and friends
        return False


def frame_image(i: int, height: int, width: int) -> np.ndarray:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[: height // 2] = level(i % 26)  # levels repeat after 26 frames
    return arr


def write_video(path: Path, fmt: str = "mp4_h264", frames: int = 12, height: int = 32, width: int = 48,
                fps: int = 25, vfr: bool = False, rotation: int = 0, audio: bool = False) -> Path:
    """Write `frames` frames as they are to be shown (`height` x `width`). `rotation` (degrees counter-
    clockwise, a multiple of 90) is stored as the stream's display matrix, the pixels stored turned the
    other way, as a phone does; `vfr` gives irregular timestamps; `audio` adds a silent AAC track."""
    container, codec, opts = FORMATS[fmt]
    k = (rotation // 90) % 4
    sh, sw = (width, height) if k % 2 else (height, width)
    with av.open(str(path), "w", format=container) as c:
        st = c.add_stream(codec, rate=fps, options=dict(opts))
        st.width, st.height, st.pix_fmt = sw, sh, "yuv420p"
        if rotation:
            st.set_display_rotation(rotation)
        if vfr:
            st.codec_context.time_base = st.time_base = Fraction(1, 1000)
        rate = 48000 if container == "webm" else 16000
        a_st = c.add_stream("libopus" if container == "webm" else "aac", rate=rate) if audio else None
        t_ms = 0
        for i in range(frames):
            shown = frame_image(i, height, width)
            fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(shown, -k)), format="rgb24")
            if vfr:
                fr.pts, fr.time_base = t_ms, Fraction(1, 1000)
                t_ms += (20, 70, 35)[i % 3]
            for p in st.encode(fr):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
        if a_st is not None:
            samples = int(rate * frames / fps)
            af = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = rate, 0
            for p in a_st.encode(af):
                c.mux(p)
            for p in a_st.encode():
                c.mux(p)
    return path
