"""PyAV transcoding to the s4v clip format, and clip validation.

Clips are H.264 yuv420p (or VP9 with `codec="vp9"`, which DALI's CPU decoder also reads), constant
frame rate, a fixed short side, short closed GOPs without B-frames, moov first (`+faststart`).
Everything happens in memory; no ffmpeg binary is needed.

Reruns give the same frames, sizes and metadata, but libx264 (as bundled with PyAV) now and then
encodes a few frames of a clip differently between runs (seen on ~1 in 50 encodes of tiny clips), so
shards are reproducible in content and order, not always byte for byte.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Iterator, Optional

import av
import numpy as np

from data_prep.mp4 import faststart
from data_prep.records import VideoRecord, time_range_problem

CODECS = {"h264": "libx264", "vp9": "libvpx-vp9"}
DEFAULT_CRF = {"h264": 23, "vp9": 32}
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class RejectError(Exception):
    """A source that cannot become a clip; the message is the reason written to the rejects list."""


@dataclass(frozen=True)
class EncodeOptions:
    codec: str = "h264"  # h264 | vp9
    fps: Optional[float] = None  # None: the source rate, rounded to an integer
    short_side: int = 320  # 0: keep the source size (rounded to even)
    gop: int = 16
    crf: Optional[int] = None  # None: DEFAULT_CRF[codec]
    preset: str = "fast"  # x264 preset
    max_seconds: Optional[float] = None

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, got {self.codec!r}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")


@dataclass
class ClipProbe:
    """What a full PyAV decode of a finished clip found."""

    frames: int
    width: int
    height: int
    fps: float
    codec: str
    keyframes: int


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Scale down so the short side is `short_side`, both sides even; a source whose short side is
    already at most `short_side` (or `short_side` 0) keeps its size (never upscaled)."""
    if short_side and min(width, height) > short_side:
        scale = short_side / min(width, height)
        width, height = width * scale, height * scale
    return max(2, 2 * round(width / 2)), max(2, 2 * round(height / 2))


def encode_frames(frames: Iterable[av.VideoFrame | np.ndarray], fps: float | Fraction, opts: EncodeOptions,
                  size: Optional[tuple[int, int]] = None) -> bytes:
    """Encode frames (PyAV frames of any format, or HxWx3 uint8 RGB arrays) into an in-memory MP4.

    `size` is the output (width, height); default: `opts.short_side` applied to the first frame.
    """
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = None
        for i, frame in enumerate(frames):
            if isinstance(frame, np.ndarray):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if stream is None:
                width, height = size or output_size(frame.width, frame.height, opts.short_side)
                stream = _add_stream(out, rate, width, height, opts)
            down = width * height < frame.width * frame.height
            frame = frame.reformat(width=width, height=height, format="yuv420p",
                                   interpolation="AREA" if down else "BICUBIC")
            frame.pts, frame.time_base = i, Fraction(1) / rate
            frame.pict_type = av.video.frame.PictureType.NONE  # a source keyframe must not force one here
            out.mux(stream.encode(frame))
        if stream is None:
            raise RejectError("no frames decoded from source")
        out.mux(stream.encode(None))
    return faststart(buf.getvalue())


def _add_stream(out: av.container.OutputContainer, rate: Fraction, width: int, height: int,
                opts: EncodeOptions) -> av.VideoStream:
    stream = out.add_stream(CODECS[opts.codec], rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.time_base = Fraction(1) / rate
    ctx = stream.codec_context
    ctx.gop_size, ctx.max_b_frames, ctx.thread_count = opts.gop, 0, 1  # parallelism is across processes
    crf = str(opts.crf if opts.crf is not None else DEFAULT_CRF[opts.codec])
    if opts.codec == "h264":
        stream.options = {"preset": opts.preset, "crf": crf, "x264-params":
                          f"keyint={opts.gop}:min-keyint={opts.gop}:scenecut=0:bframes=0:open-gop=0"}
    else:
        stream.options = {"crf": crf, "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "0",
                          "keyint_min": str(opts.gop), "lag-in-frames": "0", "auto-alt-ref": "0"}
    return stream


def _file_frames(record: VideoRecord) -> tuple[Iterator[tuple[float, av.VideoFrame]], float, av.container.InputContainer]:
    """Frames of a video file with their times in seconds, from `record.start` on."""
    try:
        container = av.open(record.path)
    except (av.FFmpegError, OSError) as e:
        raise RejectError(f"cannot open: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise RejectError("no video stream")
    stream = container.streams.video[0]
    stream.thread_count = 1
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or float(rate) <= 0:
        container.close()
        raise RejectError("unknown frame rate")
    if record.start:
        container.seek(int(record.start / stream.time_base), stream=stream, backward=True)

    def gen() -> Iterator[tuple[float, av.VideoFrame]]:
        for n, frame in enumerate(container.decode(stream)):
            yield (frame.time if frame.time is not None else n / float(rate)), frame

    return gen(), float(rate), container


def _folder_frames(record: VideoRecord) -> tuple[Iterator[tuple[float, np.ndarray]], float]:
    from PIL import Image

    files = sorted(f for f in os.listdir(record.frames_dir) if f.lower().endswith(FRAME_EXTENSIONS))
    if not files:
        raise RejectError(f"no frames in {record.frames_dir}")
    rate = float(record.frame_rate or 12.0)

    def gen() -> Iterator[tuple[float, np.ndarray]]:
        for n, name in enumerate(files):
            with Image.open(os.path.join(record.frames_dir, name)) as img:
                yield n / rate, np.asarray(img.convert("RGB"))

    return gen(), rate


def resample_cfr(frames: Iterable[tuple[float, object]], src_rate: float, fps: float,
                 start: Optional[float] = None, max_duration: Optional[float] = None) -> Iterator[object]:
    """Constant-rate output: output frame n shows the latest source frame whose time rounds to <= n.

    Frames are duplicated or dropped as needed (like ffmpeg's fps filter). Times are relative to
    `start` (or to the first frame); at most `max_duration` seconds are produced.
    """
    limit = math.floor(max_duration * fps + 0.5) if max_duration is not None else None
    origin, prev, nxt, last_t = start, None, 0, 0.0
    for t, frame in frames:
        if start is not None and t < start - 0.5 / src_rate:
            continue  # before the range (after a backward seek)
        if origin is None:
            origin = t
        last_t = t - origin
        slot = max(0, math.floor(last_t * fps + 0.5))
        if limit is not None and slot >= limit:
            break
        if prev is not None:
            while nxt < slot:
                yield prev
                nxt += 1
        prev = frame
    if prev is None:
        return
    end = math.floor((last_t + 1.0 / src_rate) * fps + 0.5)
    if limit is not None:
        end = min(end, limit)
    while nxt < max(end, 1):
        yield prev
        nxt += 1


class _Tracked:
    """Passes (time, frame) pairs through and remembers the last source time seen."""

    def __init__(self, frames: Iterable[tuple[float, object]]):
        self.frames, self.last = frames, None

    def __iter__(self) -> Iterator[tuple[float, object]]:
        for t, frame in self.frames:
            self.last = t
            yield t, frame


def _counted(frames: Iterable[object], counter: list[int]) -> Iterator[object]:
    for frame in frames:
        counter[0] += 1
        yield frame


def transcode(record: VideoRecord, opts: EncodeOptions) -> bytes:
    """Transcode one source (video file or frame folder, optionally trimmed) to an s4v clip.

    A time range [start, end) must lie inside the video (one output frame of slack at the end);
    otherwise the record is rejected with the video's length in the reason.
    """
    if record.missing_reason:
        raise RejectError(record.missing_reason)
    problem = time_range_problem(record.start, record.end)
    if problem:
        raise RejectError(problem)
    container = None
    try:
        if record.frames_dir:
            frames, src_rate = _folder_frames(record)
        elif record.path:
            frames, src_rate, container = _file_frames(record)
        else:
            raise RejectError("record has neither a video path nor a frame folder")
        fps = opts.fps or max(1, round(src_rate))
        duration = None
        if record.end is not None:
            duration = record.end - (record.start or 0.0)
        if opts.max_seconds is not None:
            duration = min(duration, opts.max_seconds) if duration is not None else opts.max_seconds
        if duration is not None and duration <= 0:
            raise RejectError(f"empty time range {record.start}..{record.end}")
        source, produced = _Tracked(frames), [0]
        try:
            data = encode_frames(_counted(resample_cfr(source, src_rate, fps, record.start, duration), produced),
                                 fps, opts)
        except RejectError:
            if record.start and source.last is not None:  # every frame was before the range
                raise RejectError(f"time range outside the video: starts at {record.start:g} s, the video ends at "
                                  f"{source.last + 1 / src_rate:.3f} s") from None
            raise
        if record.end is not None and produced[0] < math.floor(duration * fps + 0.5) - 1:
            video_end = (source.last or 0.0) + 1 / src_rate
            raise RejectError(f"time range outside the video: {record.start or 0:g}..{record.end:g} s, the video "
                              f"ends at {video_end:.3f} s")
        return data
    except RejectError:
        raise
    except (av.FFmpegError, OSError, ValueError, SyntaxError) as e:  # PIL raises OSError/SyntaxError
        raise RejectError(f"transcode failed: {type(e).__name__}: {e}") from None
    finally:
        if container is not None:
            container.close()


def probe_clip(data: bytes) -> ClipProbe:
    """Decode every frame of a clip with PyAV; raise RejectError if any of it is unreadable."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise RejectError("validation: no video stream in output")
            stream = container.streams.video[0]
            frames = keyframes = 0
            width = height = 0
            for frame in container.decode(stream):
                frames += 1
                keyframes += bool(frame.key_frame)
                width, height = frame.width, frame.height
            rate = stream.average_rate or stream.guessed_rate
            return ClipProbe(frames, width, height, float(rate) if rate else 0.0, stream.codec_context.name, keyframes)
    except RejectError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise RejectError(f"validation decode failed: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class Transcoder:
    """The shard writer's producer for real datasets (picklable for the process pool)."""

    opts: EncodeOptions

    def __call__(self, record: VideoRecord) -> bytes:
        return transcode(record, self.opts)
