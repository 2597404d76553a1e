"""Pure-PyTorch fallback engine: PyAV decoding with keyframe-aware seeking in DataLoader workers.

Same samples, frame indices and augmentation choices as the DALI engine (both execute the
`SamplePlan`s of augment.py); only the pixel arithmetic differs (swscale/torch resampling,
torchvision RandAugment ops), so outputs agree to within a few grey levels.
"""
from __future__ import annotations

import io
import math
from typing import Iterator, Optional

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from s4v.data.augment import RA_BINS, RA_OPS, SamplePlan, View
from s4v.data.batch import HostBatch, assemble, prepare_batch
from s4v.data.config import DataConfig
from s4v.data.reader import RawSample, SampleError, ShardReader
from s4v.data.shards import ShardTable, worker_batches


def decode_frames(key: str, data: bytes, wanted: np.ndarray) -> dict[int, av.VideoFrame]:
    """Decode the frames with the given indices, seeking to a keyframe only when that skips work.

    A demux pass (no decoding) maps frame index -> pts and finds the keyframes; indices past the
    end get the last frame (DALI's pad_mode="edge").
    """
    try:
        with av.open(io.BytesIO(data)) as c:
            st = c.streams.video[0]
            st.codec_context.thread_count = 1  # parallelism comes from DataLoader workers
            pk = sorted((p.pts, bool(p.is_keyframe)) for p in c.demux(st) if p.pts is not None)
            if not pk:
                raise SampleError(key, "no video packets")
            pts = [p for p, _ in pk]
            where = {p: i for i, p in enumerate(pts)}
            keyframes = [i for i, (_, k) in enumerate(pk) if k] or [0]
            targets = sorted({min(int(i), len(pts) - 1) for i in wanted})
            out: dict[int, av.VideoFrame] = {}
            frames_iter, cur = None, -1  # cur: index of the last decoded frame
            for t in targets:
                kf = keyframes[max(0, np.searchsorted(keyframes, t, side="right") - 1)]
                if frames_iter is None or kf > cur + 1:
                    c.seek(pts[kf], stream=st, backward=True, any_frame=False)
                    frames_iter, cur = c.decode(st), kf - 1
                for fr in frames_iter:
                    cur = where.get(fr.pts, cur + 1)
                    if cur >= t:
                        out[t] = fr
                        break
                else:
                    raise SampleError(key, f"frame {t} not decodable")
            for i in wanted:  # clamped indices share the frame
                out.setdefault(int(i), out[min(int(i), len(pts) - 1)])
            return out
    except av.error.FFmpegError as e:
        raise SampleError(key, f"decode failed: {e}") from None


# ----------------------------------------------------------------------------- RandAugment (torch)


def _ra_value(op: str, mag_bin: int, max_translate: int) -> float:
    neg = mag_bin < 0
    b = -mag_bin - 1 if neg else mag_bin
    lo, hi = {"translate_x": (0, max_translate), "translate_y": (0, max_translate), "shear_x": (0, 0.3),
              "shear_y": (0, 0.3), "rotate": (0, 30), "brightness": (0, 0.9), "contrast": (0, 0.9),
              "color": (0, 0.9), "sharpness": (0, 0.9), "posterize": (8, 4), "solarize": (256, 0)}.get(op, (0, 0))
    v = lo + (hi - lo) * b / (RA_BINS - 1)
    return -v if neg else v


def rand_augment(x: torch.Tensor, ops: list[tuple[int, int]], max_translate: int) -> torch.Tensor:
    """Apply a view's RandAugment ops to uint8 frames [T, 3, H, W] (same op for every frame)."""
    import torchvision.transforms.v2.functional as TF

    for op_idx, mag_bin in ops:
        op = RA_OPS[op_idx][0]
        v = _ra_value(op, mag_bin, max_translate)
        aff = dict(angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=[0.0, 0.0], fill=128)
        if op == "translate_x":
            x = TF.affine(x, **{**aff, "translate": [v, 0.0]})
        elif op == "translate_y":
            x = TF.affine(x, **{**aff, "translate": [0.0, v]})
        elif op == "shear_x":
            x = TF.affine(x, **{**aff, "shear": [math.degrees(math.atan(v)), 0.0]})
        elif op == "shear_y":
            x = TF.affine(x, **{**aff, "shear": [0.0, math.degrees(math.atan(v))]})
        elif op == "rotate":
            x = TF.rotate(x, v, fill=128)
        elif op == "brightness":
            x = TF.adjust_brightness(x, 1 + v)
        elif op == "contrast":
            x = TF.adjust_contrast(x, 1 + v)
        elif op == "color":
            x = TF.adjust_saturation(x, 1 + v)
        elif op == "sharpness":
            x = TF.adjust_sharpness(x, 1 + v)
        elif op == "posterize":
            x = TF.posterize(x, int(min(8, max(1, round(v)))))
        elif op == "solarize":
            x = TF.solarize(x, v)
        elif op == "equalize":
            x = TF.equalize(x)
        elif op == "auto_contrast":
            x = TF.autocontrast(x)
    return x


# ----------------------------------------------------------------------------- one sample


def _resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)


def render_sample(cfg: DataConfig, raw: RawSample, plan: SamplePlan) -> torch.Tensor:
    """Decode and augment one sample: [V, T, 3, image_size, image_size] float32, normalised."""
    decoded = decode_frames(raw.key, raw.video, plan.frames.reshape(-1))
    rh, rw = plan.resized
    full = any(v.ra for v in plan.views)  # RandAugment runs on the source frames, before resizing
    cache: dict[int, torch.Tensor] = {}

    def frame(i: int) -> torch.Tensor:
        if i not in cache:
            fr = decoded[i]
            arr = fr.to_ndarray(format="rgb24") if full else fr.to_ndarray(format="rgb24", width=rw, height=rh)
            cache[i] = torch.from_numpy(arr)
        return cache[i]

    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
    s = cfg.image_size
    out = []
    for view in plan.views:
        clip = torch.stack([frame(int(i)) for i in plan.frames[view.clip]]).permute(0, 3, 1, 2)  # T,3,H,W uint8
        if full:
            if view.ra:
                clip = rand_augment(clip, view.ra, cfg.rand_augment_translate)
            clip = _resize(clip.float(), (rh, rw))
        y0, x0, y1, x1 = (int(round(c)) for c in view.box)
        clip = _resize(clip[:, :, y0:y1, x0:x1].float(), (s, s)).clamp_(0, 255)
        out.append(_finish(clip, view, mean, std))
    return torch.stack(out)


def _finish(clip: torch.Tensor, view: View, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    if view.flip:
        clip = clip.flip(-1)
    if view.gray:
        g = (0.299 * clip[:, 0] + 0.587 * clip[:, 1] + 0.114 * clip[:, 2]).unsqueeze(1)
        clip = g.expand(-1, 3, -1, -1)
    return ((clip - mean) / std).contiguous()


def render_batch(cfg: DataConfig, train: bool, hb: HostBatch) -> tuple[dict, list[tuple[str, str]]]:
    views: list[Optional[torch.Tensor]] = []
    skipped = list(hb.skipped)
    for slot in hb.slots:
        if slot is None:
            views.append(None)
            continue
        raw, plan = slot
        try:
            views.append(render_sample(cfg, raw, plan))
        except SampleError as e:
            skipped.append((e.key, e.reason))
            views.append(None)
    return assemble(cfg, train, hb.slots, views), skipped


# ----------------------------------------------------------------------------- engine


class _EpochDataset(IterableDataset):
    def __init__(self, cfg: DataConfig, root: str, table: ShardTable, batches: np.ndarray, start: int,
                 train: bool, epoch: int):
        self.cfg, self.root, self.table, self.batches = cfg, root, table, batches
        self.start, self.train, self.epoch = start, train, epoch

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        reader = ShardReader(self.root, self.table)
        try:
            for b in worker_batches(len(self.batches), self.start, w, nw):
                hb = prepare_batch(self.cfg, reader, b, self.batches[b], self.train, self.epoch)
                batch, skipped = render_batch(self.cfg, self.train, hb)
                batch["_index"], batch["_skipped"] = b, skipped
                yield batch
        finally:
            reader.close()


class PyAVEngine:
    name = "pyav"

    def __init__(self, cfg: DataConfig, root: str, table: ShardTable, train: bool, device: str = "cpu"):
        self.cfg, self.root, self.table, self.train = cfg, root, table, train
        self.pin = str(device).startswith("cuda") and torch.cuda.is_available()

    def iter_batches(self, batches: np.ndarray, start: int, epoch: int) -> Iterator[dict]:
        """Yield batch dicts with `_index` and `_skipped` for batches [start, len(batches))."""
        ds = _EpochDataset(self.cfg, self.root, self.table, batches, start, self.train, epoch)
        nw = min(self.cfg.num_workers, max(0, len(batches) - start))
        dl = DataLoader(ds, batch_size=None, num_workers=nw, prefetch_factor=max(1, self.cfg.prefetch) if nw else None,
                        persistent_workers=False, timeout=600 if nw else 0, pin_memory=self.pin,
                        worker_init_fn=_ignore_preemption_signals if nw else None)
        yield from dl


def _ignore_preemption_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the training process, which checkpoints and then ends them
    (torch's worker handler would otherwise die on a SIGTERM that Slurm sends to every process)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
