"""DALI engine: Python reads tar members and plans each sample; DALI decodes and augments.

The only module that imports DALI. Per batch, the host (reader.py + augment.py) feeds through
`fn.external_source`: the encoded clip, its frame indices (all test clips concatenated), and per
view the crop ROI in source pixels, the flip flag, the saturation (0 = grayscale) and the
RandAugment op/magnitude choices. The graph:

    decoders.video(frames=...)          # device "mixed" (NVDEC) on GPU, "cpu" for VP8/VP9/MJPEG tests
    -> per view: [clip slice] -> [RandAugment, same op for all frames] -> ROI resize to image_size
    -> [saturation] -> crop_mirror_normalize(mirror=flip, FCHW, float)

Because every random choice is an input, the pipeline is stateless across batches: a corrupt
clip (which kills a DALI pipeline; there is no skip option) is handled by rebuilding the pipeline
and re-running that batch's samples one at a time, skipping the ones that fail. Nothing waits on
a dead pipeline, so nothing hangs. A background thread runs read + decode `prefetch` batches ahead.
"""
from __future__ import annotations

import ctypes
import queue
import threading
import warnings
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from s4v.data.augment import RA_BINS, RA_OPS, parse_rand_augment
from s4v.data.batch import HostBatch, assemble, log, prepare_batch
from s4v.data.config import DataConfig
from s4v.data.reader import ShardReader
from s4v.data.shards import ShardTable


def _view_layout(cfg: DataConfig, train: bool) -> list[int]:
    """Clip index of each view (see batch.py for the view order)."""
    if train:
        return [0] * cfg.repeated_aug
    return [k for k in range(cfg.test_clips) for _ in range(cfg.test_crops)]


def build_pipeline(cfg: DataConfig, train: bool, decode_device: str, device_id: Optional[int],
                   batch_size: int) -> tuple[Pipeline, list[str]]:
    """The decode + augment graph and the names of the external sources it reads (see `_inputs`)."""
    views = _view_layout(cfg, train)
    t, s = cfg.num_frames, cfg.image_size
    ra = parse_rand_augment(cfg.rand_augment) if (train and cfg.rand_augment) else None
    gray = train and cfg.grayscale_prob > 0

    def graph():
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        roi = fn.external_source(name="roi", dtype=types.FLOAT, ndim=2)  # [V, 4] y0 x0 y1 x1
        flip = fn.external_source(name="flip", dtype=types.INT32, ndim=1)  # [V]
        sat = fn.external_source(name="sat", dtype=types.FLOAT, ndim=1) if gray else None  # [V]
        if ra is not None:
            from nvidia.dali.auto_aug import rand_augment as dali_ra
            from nvidia.dali.auto_aug.core import select, signed_bin

            suite = dali_ra.get_rand_augment_suite(use_shape=False, max_translate_abs=cfg.rand_augment_translate)
            names = [a.name.split(".")[-1] for a in suite]
            if names != [n for n, _ in RA_OPS]:
                raise RuntimeError(f"DALI RandAugment suite changed: {names}; update augment.RA_OPS")
            ra_op = fn.external_source(name="ra_op", dtype=types.INT32, ndim=2)  # [V, n]
            ra_mag = fn.external_source(name="ra_mag", dtype=types.INT32, ndim=2)
            ra_neg = fn.external_source(name="ra_neg", dtype=types.INT32, ndim=2)
        video = fn.decoders.video(enc, device=decode_device, frames=frames, pad_mode="edge")  # [C*T, H, W, 3]
        outs = []
        for v, k in enumerate(views):
            clip = video[k * t:(k + 1) * t] if cfg.test_clips > 1 and not train else video
            if ra is not None:
                for level in range(ra.n):
                    clip = select(suite, ra_op[v, level], data=clip,
                                  magnitude_bin=signed_bin(ra_mag[v, level], ra_neg[v, level]),
                                  num_magnitude_bins=RA_BINS, fill_value=128)
            clip = fn.resize(clip, size=[s, s], roi_start=roi[v, 0:2], roi_end=roi[v, 2:4], antialias=True,
                             interp_type=types.INTERP_LINEAR)
            if gray:
                clip = fn.saturation(clip, saturation=sat[v])
            clip = fn.crop_mirror_normalize(clip, dtype=types.FLOAT, output_layout="FCHW",
                                            mean=[m * 255 for m in cfg.mean], std=[x * 255 for x in cfg.std],
                                            mirror=flip[v])
            outs.append(clip)
        return tuple(outs)

    # DALI's own auto_aug suite calls deprecated fn.experimental aliases and forces the warning
    # filter to "default", so drop those messages at display time instead (only while building).
    show = warnings.showwarning

    def quiet(message, category, *args, **kwargs):
        if not (issubclass(category, DeprecationWarning) and "fn.experimental" in str(message)):
            show(message, category, *args, **kwargs)

    warnings.showwarning = quiet
    try:
        pipe = pipeline_def(graph, enable_conditionals=ra is not None)(
            batch_size=batch_size, num_threads=max(1, cfg.num_workers), device_id=device_id, seed=cfg.seed,
            prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        pipe.build()
    finally:
        warnings.showwarning = show
    names = ["enc", "frames", "roi", "flip"] + (["sat"] if gray else []) + (["ra_op", "ra_mag", "ra_neg"] if ra else [])
    return pipe, names


def _inputs(slots) -> dict[str, list[np.ndarray]]:
    feed: dict[str, list[np.ndarray]] = {k: [] for k in ("enc", "frames", "roi", "flip", "sat", "ra_op", "ra_mag", "ra_neg")}
    for raw, plan in slots:
        feed["enc"].append(np.frombuffer(raw.video, np.uint8))
        feed["frames"].append(plan.frames.reshape(-1).astype(np.int32))
        feed["roi"].append(np.array([plan.roi(v) for v in plan.views], np.float32))
        feed["flip"].append(np.array([int(v.flip) for v in plan.views], np.int32))
        feed["sat"].append(np.array([0.0 if v.gray else 1.0 for v in plan.views], np.float32))
        ra = [[(op, b if b >= 0 else -b - 1, int(b < 0)) for op, b in v.ra] for v in plan.views]
        arr = np.array(ra, np.int32).reshape(len(plan.views), -1, 3)
        feed["ra_op"].append(arr[..., 0].copy())
        feed["ra_mag"].append(arr[..., 1].copy())
        feed["ra_neg"].append(arr[..., 2].copy())
    return feed


NVDEC_LIBRARY = "libnvcuvid.so.1"


def nvdec_problem(load: Callable[[str], object] = ctypes.CDLL) -> Optional[str]:
    """Why DALI's `mixed` video decoder cannot work here, or None. NVDEC is reached through the driver's
    libnvcuvid, which container runtimes mount only when asked to; without it every clip fails to
    decode, so the engine says so once instead of skipping every sample."""
    try:
        load(NVDEC_LIBRARY)
    except OSError as e:
        return (f"NVDEC is not available to this process ({NVDEC_LIBRARY} cannot be loaded: {e}). In a "
                "container the NVIDIA runtime mounts it only when NVIDIA_DRIVER_CAPABILITIES includes 'video' "
                "(e.g. compute,utility,video or all). Or decode on the CPU with data.loader=pyav.")
    return None


class _DecodeFailure(Exception):
    """DALI failed while running a batch (bad data); the pipeline object is unusable now."""


def _first_line(e: BaseException) -> str:
    if isinstance(e, _DecodeFailure) and e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "Failed" in ln or "Invalid" in ln or "not supported" in ln:
            return ln[:300]
    return (lines[0] if lines else type(e).__name__)[:300]


class DaliEngine:
    name = "dali"

    def __init__(self, cfg: DataConfig, root: str, table: ShardTable, train: bool, device: str = "cpu"):
        self.cfg, self.root, self.table, self.train = cfg, root, table, train
        self.decode_device = "mixed" if cfg.device == "gpu" else "cpu"
        if self.decode_device == "mixed":
            if not torch.cuda.is_available():
                raise RuntimeError("data.device=gpu needs CUDA; use data.device=cpu (VP9 shards) or data.loader=pyav")
            problem = nvdec_problem()
            if problem:
                raise RuntimeError(f"data.device=gpu: {problem}")
            dev = torch.device(device if str(device).startswith("cuda") else "cuda")
            self.device_id = dev.index if dev.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None
        self.max_batch = cfg.batch_size
        self.pipe: Optional[Pipeline] = None
        self.rebuilds = 0  # pipeline rebuilds after failures

    # -- pipeline
    def _build(self) -> None:
        self.pipe = None  # drop the dead pipeline first (frees its threads and memory)
        self.pipe, self.input_names = build_pipeline(self.cfg, self.train, self.decode_device, self.device_id,
                                                     self.max_batch)

    def _to_torch(self, tl) -> torch.Tensor:
        if self.decode_device == "cpu":
            return torch.from_numpy(np.array(tl.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.float32, device=torch.device("cuda", self.device_id))
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device_id))
        return out

    def _run(self, slots) -> list[torch.Tensor]:
        """Decode + augment `slots`; [V, T, 3, S, S] per sample. Raises on any DALI error."""
        feed = _inputs(slots)
        for name in self.input_names:
            self.pipe.feed_input(name, feed[name])
        try:
            outs = self.pipe.run()
        except Exception as e:
            raise _DecodeFailure(e) from e
        outs = [self._to_torch(o) for o in outs]  # V x [b, T, 3, S, S]
        video = torch.stack(outs, dim=1)
        return list(video.unbind(0))

    def render_batch(self, hb: HostBatch) -> tuple[dict, list[tuple[str, str]]]:
        skipped = list(hb.skipped)
        live = [i for i, s in enumerate(hb.slots) if s is not None]
        views: list[Optional[torch.Tensor]] = [None] * len(hb.slots)
        if live:
            if self.pipe is None:
                self._build()  # outside the try: a graph that cannot build is a bug, not bad data
            try:
                for i, out in zip(live, self._run([hb.slots[i] for i in live])):
                    views[i] = out
            except _DecodeFailure as e:  # the pipeline is dead now: find the culprit(s) one sample at a time
                log.warning("data: DALI failed on batch %d (%s); rebuilding and retrying per sample",
                            hb.index, _first_line(e))
                self._rebuild()
                for i in live:
                    try:
                        views[i] = self._run([hb.slots[i]])[0]
                    except _DecodeFailure as e1:
                        skipped.append((hb.slots[i][1].key, _first_line(e1)))
                        self._rebuild()
        return assemble(self.cfg, self.train, hb.slots, views), skipped

    def _rebuild(self) -> None:
        self.rebuilds += 1
        self._build()

    # -- iteration
    def iter_batches(self, batches: np.ndarray, start: int, epoch: int) -> Iterator[dict]:
        q: queue.Queue = queue.Queue(maxsize=max(1, self.cfg.prefetch))
        stop = threading.Event()

        def put(item) -> bool:
            """Hand `item` to the consumer; False when the consumer has gone (stop is set)."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            reader = ShardReader(self.root, self.table)
            try:
                for b in range(start, len(batches)):
                    hb = prepare_batch(self.cfg, reader, b, batches[b], self.train, epoch)
                    batch, skipped = self.render_batch(hb)
                    batch["_index"], batch["_skipped"] = b, skipped
                    if not put(batch):
                        return
                put(None)
            except BaseException as e:  # hand any error to the consumer instead of dying silently
                put(e)
            finally:
                reader.close()

        th = threading.Thread(target=produce, name="s4v-dali-producer", daemon=True)
        th.start()
        try:
            while True:
                try:
                    item = q.get(timeout=5.0)
                except queue.Empty:
                    if not th.is_alive():
                        raise RuntimeError("DALI producer thread exited without a result") from None
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            th.join(timeout=60)
