"""Pure-PyTorch fallback engine: PyAV decoding with keyframe-aware seeking in DataLoader workers.

Same samples, frame indices and augmentation choices as the DALI engine (both execute the
`SamplePlan`s of augment.py); only the pixel arithmetic differs (one antialiased uint8 resampling of
the crop box rounded to whole source pixels, torchvision RandAugment ops), so outputs agree to within
a few grey levels. Each batch is normalised once into one preallocated tensor: in shared memory in a
DataLoader worker (handed over without a copy), pinned when rendered in-process for a GPU run.
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable, Iterator, Optional

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from s4v.data.augment import RA_BINS, RA_OPS, SamplePlan, View, num_views
from s4v.data.batch import HostBatch, prepare_batch
from s4v.data.config import DataConfig
from s4v.data.reader import RawSample, SampleError, ShardReader
from s4v.data.shards import ShardTable, worker_batches


def decode_frames(key: str, data: bytes, wanted: np.ndarray,
                  convert: Optional[Callable[[av.VideoFrame], Any]] = None) -> dict[int, Any]:
    """Decode the frames with the given indices, seeking to a keyframe only when that skips work;
    `convert` (e.g. to an RGB array) is applied to each as it is decoded, so no frame is held.

    The frame table (frame index -> pts, keyframes) comes from the container's index when it lists
    every frame inside `data` (mp4), else from a demux pass (no decoding); a decoded frame whose pts
    the index does not hold sends the sample through the demux pass. Indices past the end get the
    last frame (DALI's pad_mode="edge").
    """
    try:
        try:
            return _decode(key, data, wanted, convert, use_index=True)
        except _IndexMismatch:
            return _decode(key, data, wanted, convert, use_index=False)
    except av.error.FFmpegError as e:
        raise SampleError(key, f"decode failed: {e}") from None


class _IndexMismatch(Exception):
    pass


def _frame_table(c: av.container.InputContainer, st: av.VideoStream, size: int,
                 use_index: bool) -> tuple[list[tuple[int, bool]], bool]:
    """Sorted (pts, keyframe) of every frame, and whether it came from the container's index."""
    if use_index and st.frames > 0:
        entries = st.index_entries
        if (len(entries) == st.frames and all(e.pos + e.size <= size and not e.is_discard for e in entries)):
            return sorted((e.timestamp, bool(e.is_keyframe)) for e in entries), True
    return sorted((p.pts, bool(p.is_keyframe)) for p in c.demux(st) if p.pts is not None), False


def _decode(key: str, data: bytes, wanted: np.ndarray, convert, use_index: bool) -> dict[int, Any]:
    with av.open(io.BytesIO(data)) as c:
        st = c.streams.video[0]
        st.codec_context.thread_count = 1  # parallelism comes from DataLoader workers
        pk, from_index = _frame_table(c, st, len(data), use_index)
        if not pk:
            raise SampleError(key, "no video packets")
        pts = [p for p, _ in pk]
        where = {p: i for i, p in enumerate(pts)}
        keyframes = [i for i, (_, k) in enumerate(pk) if k] or [0]
        targets = sorted({min(int(i), len(pts) - 1) for i in wanted})
        out: dict[int, Any] = {}
        frames_iter, cur = None, -1  # cur: index of the last decoded frame
        for t in targets:
            kf = keyframes[max(0, np.searchsorted(keyframes, t, side="right") - 1)]
            if frames_iter is None or kf > cur + 1:
                c.seek(pts[kf], stream=st, backward=True, any_frame=False)
                frames_iter, cur = c.decode(st), kf - 1
            for fr in frames_iter:
                if from_index and fr.pts not in where:
                    raise _IndexMismatch()
                cur = where.get(fr.pts, cur + 1)
                if cur >= t:
                    out[t] = convert(fr) if convert is not None else fr
                    break
            else:
                if from_index:
                    raise _IndexMismatch()
                raise SampleError(key, f"frame {t} not decodable")
        for i in wanted:  # clamped indices share the frame
            out.setdefault(int(i), out[min(int(i), len(pts) - 1)])
        return out


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
    """Antialiased bilinear resize of [N, 3, H, W] (uint8 or float) to `hw`."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)


def source_box(plan: SamplePlan, view: View) -> tuple[int, int, int, int]:
    """The view's crop box in whole source pixels (plan.roi() rounded, at least one pixel)."""
    h, w = plan.size
    y0, x0, y1, x1 = plan.roi(view)
    y0, x0 = min(max(0, round(y0)), h - 1), min(max(0, round(x0)), w - 1)
    return y0, x0, max(y0 + 1, min(h, round(y1))), max(x0 + 1, min(w, round(x1)))


class _Normaliser:
    """uint8 [T, 3, S, S] -> normalised float32 written into a slice of the batch, in two passes."""

    def __init__(self, cfg: DataConfig):
        self.mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(cfg.std).view(1, 3, 1, 1) * 255)
        self.luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor, gray: bool, out: torch.Tensor) -> None:
        if gray:  # luma from the resampled pixels, then each channel normalised as usual
            x = (x * self.luma).sum(1, keepdim=True).expand(-1, 3, -1, -1)
        torch.sub(x, self.mean, out=out)
        out.mul_(self.inv_std)


def render_sample(cfg: DataConfig, raw: RawSample, plan: SamplePlan, out: Optional[torch.Tensor] = None,
                  norm: Optional[_Normaliser] = None) -> torch.Tensor:
    """Decode and augment one sample into `out` (allocated if None): [V, T, 3, image_size, image_size]
    float32, normalised. Each kept frame is converted to RGB at its own size (no swscale resampling)."""
    rgb = decode_frames(raw.key, raw.video, plan.frames.reshape(-1), _to_rgb)
    return render_views(cfg, plan, rgb, plan.frames, out, norm)


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def render_views(cfg: DataConfig, plan: SamplePlan, rgb: dict[int, np.ndarray], frames: np.ndarray,
                 out: Optional[torch.Tensor] = None, norm: Optional[_Normaliser] = None) -> torch.Tensor:
    """The views of `plan` from source-size RGB frames (`rgb[i]`: [H, W, 3] uint8 of frame i, `frames`:
    the plan's [clips, T] indices) into `out` [V, T, 3, S, S] float32, normalised.

    RandAugment (if any) runs on the source frames; the view's box in source pixels is resampled once,
    on uint8, straight to image_size; flip and normalisation follow on the small result.
    """
    s = cfg.image_size
    if out is None:
        out = torch.empty(len(plan.views), frames.shape[1], 3, s, s)
    norm = norm or _Normaliser(cfg)
    for v, view in enumerate(plan.views):
        y0, x0, y1, x1 = source_box(plan, view)
        idx = [int(i) for i in frames[view.clip]]
        if view.ra:  # the ops see the whole frame (translate/rotate fill from outside the box)
            clip = torch.from_numpy(np.stack([rgb[i] for i in idx])).permute(0, 3, 1, 2)
            clip = rand_augment(clip, view.ra, cfg.rand_augment_translate)[:, :, y0:y1, x0:x1]
        else:  # crop before stacking: only the box's pixels are copied
            clip = torch.from_numpy(np.stack([rgb[i][y0:y1, x0:x1] for i in idx])).permute(0, 3, 1, 2)
        clip = _resize(clip.contiguous(memory_format=torch.channels_last), (s, s))
        if view.flip:
            clip = clip.flip(-1)
        norm(clip, view.gray, out[v])
    return out


def _shared_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor born in shared memory: a DataLoader worker hands it over without a copy."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


def render_batch(cfg: DataConfig, train: bool, hb: HostBatch, pin: bool = False) -> tuple[dict, list[tuple[str, str]]]:
    """Render a batch into one preallocated tensor (shared memory in a DataLoader worker, pinned when
    `pin` in the main process) and build the batch dict of `batch.assemble`'s contract."""
    v = num_views(cfg, train)
    shape = (len(hb.slots), v, cfg.num_frames, 3, cfg.image_size, cfg.image_size)
    if get_worker_info() is not None:
        video = _shared_empty(shape)
    else:
        video = torch.empty(shape, pin_memory=pin)
    norm = _Normaliser(cfg)
    skipped = list(hb.skipped)
    ok: list[int] = []
    for i, slot in enumerate(hb.slots):
        if slot is None:
            continue
        raw, plan = slot
        try:
            render_sample(cfg, raw, plan, video[i], norm)
            ok.append(i)
        except SampleError as e:
            skipped.append((e.key, e.reason))
    return fill_batch(cfg, train, hb.slots, video, ok), skipped


def fill_batch(cfg: DataConfig, train: bool, slots: list, video: torch.Tensor, ok: list[int]) -> dict:
    """`batch.assemble` on a batch rendered in place: slots not in `ok` get a copy of the first
    rendered sample (zeros when none), labels/keys/valid as there."""
    labels, keys = [], []
    for i in range(len(slots)):
        src = i if i in ok else (ok[0] if ok else None)
        if src is None:
            video[i].zero_()
            labels.append([0] * video.shape[1])
            keys.append("")
            continue
        if src != i:
            video[i].copy_(video[src])
        plan = slots[src][1]
        labels.append([vw.label for vw in plan.views])
        keys.append(plan.key)
    valid = torch.tensor([i in ok for i in range(len(slots))], dtype=torch.bool)
    v = video.shape[1]
    if train:
        return {"video": video.flatten(0, 1),
                "label": torch.tensor(np.asarray(labels).reshape(-1), dtype=torch.int64),
                "key": [k for k in keys for _ in range(v)], "valid": valid.repeat_interleave(v)}
    return {"video": video, "label": torch.tensor([lab[0] for lab in labels], dtype=torch.int64),
            "key": keys, "valid": valid}


# ----------------------------------------------------------------------------- engine


class _EpochDataset(IterableDataset):
    def __init__(self, cfg: DataConfig, root: str, table: ShardTable, batches: np.ndarray, start: int,
                 train: bool, epoch: int, pin: bool = False):
        self.cfg, self.root, self.table, self.batches = cfg, root, table, batches
        self.start, self.train, self.epoch, self.pin = start, train, epoch, pin

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:  # a worker is one of several processes; in-process, the caller's setting stays
            torch.set_num_threads(1)
        reader = ShardReader(self.root, self.table)
        try:
            for b in worker_batches(len(self.batches), self.start, w, nw):
                hb = prepare_batch(self.cfg, reader, b, self.batches[b], self.train, self.epoch)
                batch, skipped = render_batch(self.cfg, self.train, hb, pin=self.pin)
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
        nw = min(self.cfg.num_workers, max(0, len(batches) - start))
        # in-process batches are rendered straight into pinned memory (DataLoader's pinning then keeps
        # them as they are); workers render into shared memory and the DataLoader pins a copy
        ds = _EpochDataset(self.cfg, self.root, self.table, batches, start, self.train, epoch, self.pin and not nw)
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
