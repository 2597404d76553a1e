"""Reference rows of `s4v bench loader`: a plain decode-and-crop of the loader's frames, without s4v.

For each sample the reference decodes the frames its `SamplePlan` asks for (the same indices and
crop boxes as the loaders), crops the box in source pixels and resizes it on uint8 to image_size,
and stacks a uint8 batch: no normalisation, augmentation, padding or failure handling. Decoders:
`pyav` (the library the PyAV loader uses; demux for the frame table, seek to the keyframe before a
frame when that skips work) and `torchcodec` (exact seek mode), one FFmpeg thread each. Samples are
read in index order through the same shard reader, split over DataLoader workers batch by batch.
"""
from __future__ import annotations

import io
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from s4v.data.augment import SamplePlan, plan_sample
from s4v.data.config import DataConfig
from s4v.data.format import SplitIndex
from s4v.data.reader import ShardReader
from s4v.data.shards import ShardTable

DECODERS = ("pyav", "torchcodec")


def torchcodec_problem() -> Optional[str]:
    """None when torchcodec imports and finds FFmpeg's shared libraries, else why not (one line)."""
    try:
        from torchcodec._core import ops
    except Exception as e:  # not installed, or a build for another torch
        return f"torchcodec not usable: {type(e).__name__}: {str(e).strip().splitlines()[0][:100] if str(e).strip() else ''}"
    if not getattr(ops, "_FFMPEG_AVAILABLE", True):
        return ("torchcodec not usable: FFmpeg's shared libraries (4-9) not found "
                "(e.g. apt-get install libavcodec59 libavformat59 libavfilter8 libavdevice59)")
    return None


def _pyav_frames(data: bytes, wanted: list[int]) -> dict[int, np.ndarray]:
    import av

    with av.open(io.BytesIO(data)) as c:
        st = c.streams.video[0]
        st.codec_context.thread_count = 1
        packets = sorted((p.pts, bool(p.is_keyframe)) for p in c.demux(st) if p.pts is not None)
        pts = [p for p, _ in packets]
        where = {p: i for i, p in enumerate(pts)}
        keys = [i for i, (_, k) in enumerate(packets) if k]
        out: dict[int, np.ndarray] = {}
        frames, cur = None, -1
        for t in wanted:
            kf = max((k for k in keys if k <= t), default=0)
            if frames is None or kf > cur + 1:
                c.seek(pts[kf], stream=st, backward=True)
                frames, cur = c.decode(st), kf - 1
            for fr in frames:
                cur = where.get(fr.pts, cur + 1)
                if cur >= t:
                    out[t] = fr.to_ndarray(format="rgb24")
                    break
        return out


def _torchcodec_frames(data: bytes, wanted: list[int]) -> dict[int, np.ndarray]:
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
    batch = dec.get_frames_at(indices=wanted).data
    return {t: batch[k].numpy() for k, t in enumerate(wanted)}


def render_plain(cfg: DataConfig, plan: SamplePlan, rgb: dict[int, np.ndarray]) -> torch.Tensor:
    """[V, T, 3, S, S] uint8: each view's box in source pixels, resized once."""
    s = cfg.image_size
    views = []
    for view in plan.views:
        y0, x0, y1, x1 = (int(round(c)) for c in plan.roi(view))
        clip = torch.from_numpy(np.stack([rgb[int(i)][y0:y1, x0:x1] for i in plan.frames[view.clip]]))
        clip = clip.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        views.append(F.interpolate(clip, size=(s, s), mode="bilinear", antialias=True))
    return torch.stack(views)


def reference_batches(cfg: DataConfig, split: str, train: bool, decoder: str, worker: int,
                      workers: int) -> Iterator[dict]:
    """This worker's batches (every `workers`-th): uint8 `video` [B, V, T, 3, S, S] and `frames` [B, T]."""
    index = SplitIndex.load(cfg.root, split)
    table = ShardTable.from_index(index)
    frames_of = _pyav_frames if decoder == "pyav" else _torchcodec_frames
    reader = ShardReader(cfg.root, table)
    try:
        for b in range(worker, table.num_samples // cfg.batch_size, workers):
            clips, frames = [], []
            for gid in range(b * cfg.batch_size, (b + 1) * cfg.batch_size):
                raw = reader.read(gid)
                plan = plan_sample(cfg, raw.key, raw.label, raw.frames, raw.height, raw.width, train, epoch=0)
                wanted = sorted({min(int(i), raw.frames - 1) for i in plan.frames.reshape(-1)})
                rgb = frames_of(raw.video, wanted)
                rgb.update({int(i): rgb[min(int(i), raw.frames - 1)] for i in plan.frames.reshape(-1)})
                clips.append(render_plain(cfg, plan, rgb))
                frames.append(torch.from_numpy(plan.frames[plan.views[0].clip]))
            yield {"video": torch.stack(clips), "frames": torch.stack(frames)}
    finally:
        reader.close()


class _Reference(IterableDataset):
    def __init__(self, cfg: DataConfig, split: str, train: bool, decoder: str):
        self.cfg, self.split, self.train, self.decoder = cfg, split, train, decoder

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        yield from reference_batches(self.cfg, self.split, self.train, self.decoder, w, nw)


def reference_loader(cfg: DataConfig, split: str, train: bool, decoder: str) -> DataLoader:
    """The reference as a DataLoader with the loader's worker count and prefetch."""
    nw = cfg.num_workers
    return DataLoader(_Reference(cfg, split, train, decoder), batch_size=None, num_workers=nw,
                      prefetch_factor=max(1, cfg.prefetch) if nw else None)
