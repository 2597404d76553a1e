"""DALI engine: Python reads tar members and plans each sample; DALI decodes and augments.

The only module that imports DALI. Per batch, the host (reader.py + augment.py) hands DALI, through
one `fn.external_source` callback: the encoded clips, their frame indices (all test clips
concatenated), and per view the crop ROI in source pixels, the flip flag, the saturation (0 =
grayscale) and the RandAugment op/magnitude choices. The graph:

    decoders.video(frames=...)          # device "mixed" (NVDEC) on GPU, "cpu" for VP8/VP9/MJPEG tests
    -> per view: [clip slice] -> [RandAugment, same op for all frames] -> ROI resize to image_size
    -> [saturation] -> crop_mirror_normalize(mirror=flip, FCHW, float32 or float16)
    -> views stacked inside DALI: one output [B, V, T, 3, S, S], copied once into a torch tensor

Throughput (the GPU must never wait):
- `data.dali_read_threads` threads read and plan batches ahead of the pipelines (`_ReadAhead`);
- `data.dali_pipelines` pipelines per rank take batches round-robin (on a GPU one pipeline keeps
  about one NVDEC engine busy);
- each pipeline runs pipelined and asynchronously `data.dali_prefetch` batches ahead
  (`data.dali_prefetch: 1` is the old synchronous engine, kept as the bench's baseline).

Exactness: every random choice is an input, so a pipeline is stateless across batches, and batches
are delivered in plan order whatever pipeline decoded them. A corrupt clip kills a DALI pipeline
(there is no skip option): the dead pipeline is replaced, and each batch it still owed is re-run
on a synchronous rescue pipeline, whole, then one sample at a time, skipping the samples that fail.
Nothing waits on a dead pipeline, so nothing hangs. A background thread drives it all, `prefetch`
finished batches ahead of the training loop.
"""
from __future__ import annotations

import collections
import ctypes
import os
import queue
import threading
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from s4v.data.augment import RA_BINS, RA_OPS, num_views, parse_rand_augment
from s4v.data.batch import HostBatch, log, prepare_batch
from s4v.data.config import DataConfig
from s4v.data.reader import ShardReader
from s4v.data.shards import ShardTable

# the external source's outputs: (name, dtype, ndim per sample)
_INPUTS = (("enc", types.UINT8, 1), ("frames", types.INT32, 1), ("roi", types.FLOAT, 2),  # roi: [V, 4] y0 x0 y1 x1
           ("flip", types.INT32, 1), ("sat", types.FLOAT, 1),  # [V]
           ("ra_op", types.INT32, 2), ("ra_mag", types.INT32, 2), ("ra_neg", types.INT32, 2))  # [V, n]


# Every pipeline built here, weakly. A forked child (a PyAV DataLoader worker, a test's subprocess)
# inherits the pipeline objects but not DALI's threads; destroying one there (the garbage collector
# may, if it sits in a reference cycle) waits forever for those threads. So the child keeps them.
_PIPELINES: "weakref.WeakSet[Pipeline]" = weakref.WeakSet()
_INHERITED: list[Pipeline] = []


def _keep_pipelines_in_child() -> None:
    _INHERITED.extend(_PIPELINES)


os.register_at_fork(after_in_child=_keep_pipelines_in_child)


def _view_layout(cfg: DataConfig, train: bool) -> list[int]:
    """Clip index of each view (see batch.py for the view order)."""
    if train:
        return [0] * cfg.repeated_aug
    return [k for k in range(cfg.test_clips) for _ in range(cfg.test_crops)]


def output_dtype(cfg: DataConfig) -> torch.dtype:
    """dtype of the delivered video: float16 when asked for (a half-precision tower), else float32."""
    return torch.float16 if cfg.output_dtype == "float16" else torch.float32


def input_names(cfg: DataConfig, train: bool) -> list[str]:
    """The inputs the graph of `cfg` reads, in the order the source callback returns them."""
    gray = train and cfg.grayscale_prob > 0
    ra = train and bool(cfg.rand_augment)
    return ["enc", "frames", "roi", "flip"] + (["sat"] if gray else []) + (["ra_op", "ra_mag", "ra_neg"] if ra else [])


def build_pipeline(cfg: DataConfig, train: bool, decode_device: str, device_id: Optional[int], batch_size: int,
                   source: Callable[[], tuple], prefetch: int) -> Pipeline:
    """The decode + augment graph fed by `source` (a callable returning one batch of every input of
    `input_names`, or raising StopIteration). `prefetch` >= 2: pipelined, asynchronous, that many
    batches ahead; 1: synchronous (each run waits for its batch)."""
    views = _view_layout(cfg, train)
    t, s = cfg.num_frames, cfg.image_size
    ra = parse_rand_augment(cfg.rand_augment) if (train and cfg.rand_augment) else None
    names = input_names(cfg, train)
    spec = {name: (dtype, ndim) for name, dtype, ndim in _INPUTS}
    half = output_dtype(cfg) == torch.float16

    def graph():
        inputs = fn.external_source(source=source, num_outputs=len(names), batch=True,
                                    dtype=[spec[n][0] for n in names], ndim=[spec[n][1] for n in names])
        x = dict(zip(names, inputs))
        if ra is not None:
            from nvidia.dali.auto_aug import rand_augment as dali_ra
            from nvidia.dali.auto_aug.core import select, signed_bin

            suite = dali_ra.get_rand_augment_suite(use_shape=False, max_translate_abs=cfg.rand_augment_translate)
            ops = [a.name.split(".")[-1] for a in suite]
            if ops != [n for n, _ in RA_OPS]:
                raise RuntimeError(f"DALI RandAugment suite changed: {ops}; update augment.RA_OPS")
        video = fn.decoders.video(x["enc"], device=decode_device, frames=x["frames"], pad_mode="edge")  # [C*T, H, W, 3]
        outs = []
        for v, k in enumerate(views):
            clip = video[k * t:(k + 1) * t] if cfg.test_clips > 1 and not train else video
            if ra is not None:
                for level in range(ra.n):
                    clip = select(suite, x["ra_op"][v, level], data=clip,
                                  magnitude_bin=signed_bin(x["ra_mag"][v, level], x["ra_neg"][v, level]),
                                  num_magnitude_bins=RA_BINS, fill_value=128)
            roi = x["roi"]
            clip = fn.resize(clip, size=[s, s], roi_start=roi[v, 0:2], roi_end=roi[v, 2:4], antialias=True,
                             interp_type=types.INTERP_LINEAR)
            if "sat" in x:
                clip = fn.saturation(clip, saturation=x["sat"][v])
            clip = fn.crop_mirror_normalize(clip, dtype=types.FLOAT16 if half else types.FLOAT, output_layout="FCHW",
                                            mean=[m * 255 for m in cfg.mean], std=[x_ * 255 for x_ in cfg.std],
                                            mirror=x["flip"][v])
            outs.append(clip)
        # one [V, T, 3, S, S] output per sample, so the host copies each batch once and never restacks
        return fn.stack(*outs, axis=0) if len(outs) > 1 else fn.expand_dims(outs[0], axes=[0])

    # DALI's own auto_aug suite calls deprecated fn.experimental aliases and forces the warning
    # filter to "default", so drop those messages at display time instead (only while building).
    show = warnings.showwarning

    def quiet(message, category, *args, **kwargs):
        if not (issubclass(category, DeprecationWarning) and "fn.experimental" in str(message)):
            show(message, category, *args, **kwargs)

    warnings.showwarning = quiet
    try:
        asynchronous = prefetch >= 2
        pipe = pipeline_def(graph, enable_conditionals=ra is not None)(
            batch_size=batch_size, num_threads=max(1, cfg.num_workers), device_id=device_id, seed=cfg.seed,
            prefetch_queue_depth=max(1, prefetch), exec_async=asynchronous, exec_pipelined=asynchronous)
        pipe.build()
    finally:
        warnings.showwarning = show
    _PIPELINES.add(pipe)
    return pipe


def _inputs(slots, names: list[str]) -> tuple[list[np.ndarray], ...]:
    """One batch of every input in `names` for the live `slots` ((RawSample, SamplePlan) pairs)."""
    feed: dict[str, list[np.ndarray]] = {k: [] for k, _, _ in _INPUTS}
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
    return tuple(feed[n] for n in names)


def assemble_dense(cfg: DataConfig, train: bool, slots: list, ok: list[int], dense: Optional[torch.Tensor],
                   dtype: torch.dtype, device: torch.device) -> dict:
    """The batch dict of batch.py from `dense` [len(ok), V, T, 3, S, S], the views of slots `ok`.

    Same contract as `batch.assemble` (failed and padding slots hold a copy of the first decoded
    sample and `valid` False), but the common case, every slot decoded, makes no copy: the train
    video is a view of `dense`."""
    v = num_views(cfg, train)
    n = len(slots)
    if len(ok) == n:
        video = dense
    else:
        video = torch.zeros((n, v, cfg.num_frames, 3, cfg.image_size, cfg.image_size), dtype=dtype, device=device)
        if ok:
            video[:] = dense[0]
            video[torch.tensor(ok, device=device)] = dense
    first = ok[0] if ok else None
    labels, keys = [], []
    for i in range(n):
        src = i if i in ok else first
        if src is None:
            labels.append([0] * v)
            keys.append("")
        else:
            plan = slots[src][1]
            labels.append([vw.label for vw in plan.views])
            keys.append(plan.key)
    valid = torch.zeros(n, dtype=torch.bool)
    if ok:
        valid[torch.tensor(ok)] = True
    if train:
        return {"video": video.flatten(0, 1), "label": torch.tensor(np.asarray(labels).reshape(-1), dtype=torch.int64),
                "key": [k for k in keys for _ in range(v)], "valid": valid.repeat_interleave(v)}
    return {"video": video, "label": torch.tensor([lab[0] for lab in labels], dtype=torch.int64), "key": keys,
            "valid": valid}


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


class _ReadAhead:
    """Host batches (tar members read, samples planned) in plan order, prepared by `threads` threads
    up to `ahead` batches before they are asked for (`threads` 0: read on demand, in the caller)."""

    def __init__(self, prepare: Callable[[ShardReader, int], HostBatch], new_reader: Callable[[], ShardReader],
                 todo: range, threads: int, ahead: int):
        self.prepare, self.new_reader, self.ahead = prepare, new_reader, max(1, ahead)
        self.todo = iter(todo)
        self.local = threading.local()
        self.readers: list[ShardReader] = []
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="s4v-dali-read") if threads > 0 else None
        self.pending: collections.deque[Future] = collections.deque()

    def _reader(self) -> ShardReader:  # one per thread: a reader keeps open file handles
        if not hasattr(self.local, "reader"):
            self.local.reader = self.new_reader()
            with self.lock:
                self.readers.append(self.local.reader)
        return self.local.reader

    def _job(self, b: int) -> HostBatch:
        return self.prepare(self._reader(), b)

    def _fill(self) -> None:
        while self.pool is not None and len(self.pending) < self.ahead:
            b = next(self.todo, None)
            if b is None:
                return
            self.pending.append(self.pool.submit(self._job, b))

    def next(self) -> Optional[HostBatch]:
        """The next batch in plan order, or None at the end (read errors are raised here)."""
        if self.pool is None:
            b = next(self.todo, None)
            return None if b is None else self._job(b)
        self._fill()
        if not self.pending:
            return None
        hb = self.pending.popleft().result()
        self._fill()
        return hb

    def end(self) -> None:
        """No more batches (after a read error)."""
        self.todo = iter(())
        for f in self.pending:
            f.cancel()
        self.pending.clear()

    def close(self) -> None:
        if self.pool is not None:
            for f in self.pending:
                f.cancel()
            self.pool.shutdown(wait=True)
        for r in self.readers:
            r.close()


class _Stream:
    """One asynchronous pipeline and its state; `alive` goes False when DALI raised in it."""

    def __init__(self):
        self.pipe: Optional[Pipeline] = None
        self.alive = True
        self.error = ""  # why it died


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
            self.out_device = torch.device("cuda", self.device_id)
        else:
            self.device_id = None
            self.out_device = torch.device("cpu")
        # CPU decode for a CUDA consumer: pinned host batches, so the loop's .to(non_blocking=True) is async
        self.pin = self.decode_device == "cpu" and str(device).startswith("cuda") and torch.cuda.is_available()
        self.dtype = output_dtype(cfg)
        self.max_batch = cfg.batch_size
        self.names = input_names(cfg, train)
        self.rescue_pipe: Optional[Pipeline] = None  # synchronous, built on the first failure
        self._rescue_feed: list = []
        self.rebuilds = 0  # pipelines built again after failures
        self.pipelines_built = 0

    # -- pipelines
    def _build(self, source: Callable[[], tuple], prefetch: int) -> Pipeline:
        self.pipelines_built += 1
        return build_pipeline(self.cfg, self.train, self.decode_device, self.device_id, self.max_batch, source,
                              prefetch)

    def _to_torch(self, tl) -> torch.Tensor:
        """One copy of a DALI output [b, V, T, 3, S, S] into a fresh torch tensor (DALI reuses its buffers)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=self.dtype, device=self.out_device, pin_memory=self.pin)
        stream = torch.cuda.current_stream(self.device_id) if self.out_device.type == "cuda" else None
        feed_ndarray(t, out, cuda_stream=stream)
        return out

    def _rescue_run(self, slots) -> torch.Tensor:
        """Decode `slots` synchronously on the rescue pipeline; raises _DecodeFailure (pipeline dropped)."""
        if self.rescue_pipe is None:
            # the source must not reference `self`: a cycle would leave the pipeline to the garbage
            # collector, which may run it in a forked DataLoader worker where DALI's threads are gone (hang)
            pending = self._rescue_feed
            self.rescue_pipe = self._build(lambda: pending.pop(), 1)
        self._rescue_feed.append(_inputs(slots, self.names))
        try:
            (out,) = self.rescue_pipe.run()
        except Exception as e:
            self._rescue_feed.clear()
            self.rescue_pipe = None  # dead: a fresh one next time
            self.rebuilds += 1
            raise _DecodeFailure(e) from e
        return self._to_torch(out)

    def rescue_batch(self, hb: HostBatch, why: str) -> tuple[dict, list[tuple[str, str]]]:
        """A batch whose pipeline died: the whole batch on the rescue pipeline, else one sample at a time."""
        log.warning("data: DALI failed near batch %d (%s); re-running it on a fresh pipeline", hb.index, why)
        skipped = list(hb.skipped)
        live = [i for i, s in enumerate(hb.slots) if s is not None]
        try:
            dense = self._rescue_run([hb.slots[i] for i in live])
            return assemble_dense(self.cfg, self.train, hb.slots, live, dense, self.dtype, self.out_device), skipped
        except _DecodeFailure:
            pass
        ok, views = [], []
        for i in live:
            try:
                views.append(self._rescue_run([hb.slots[i]])[0])
                ok.append(i)
            except _DecodeFailure as e:
                skipped.append((hb.slots[i][1].key, _first_line(e)))
        dense = torch.stack(views) if views else None
        return assemble_dense(self.cfg, self.train, hb.slots, ok, dense, self.dtype, self.out_device), skipped

    def render_batch(self, hb: HostBatch) -> tuple[dict, list[tuple[str, str]]]:
        """One batch, synchronously (the rescue path; for tools and tests)."""
        live = [i for i, s in enumerate(hb.slots) if s is not None]
        if not live:
            return assemble_dense(self.cfg, self.train, hb.slots, [], None, self.dtype, self.out_device), list(hb.skipped)
        try:
            dense = self._rescue_run([hb.slots[i] for i in live])
        except _DecodeFailure as e:
            return self.rescue_batch(hb, _first_line(e))
        return assemble_dense(self.cfg, self.train, hb.slots, live, dense, self.dtype, self.out_device), list(hb.skipped)

    # -- iteration
    def _decode_in_order(self, feed: _ReadAhead) -> Iterator[tuple[dict, list[tuple[str, str]], int]]:
        """(batch dict, skipped, batch index) in plan order, decoded on `data.dali_pipelines` pipelines."""
        order: collections.deque = collections.deque()  # [HostBatch, _Stream or None (nothing to decode)]
        prefetch = max(1, self.cfg.dali_prefetch)

        def new_stream() -> _Stream:
            stream = _Stream()

            def source() -> tuple:  # called by DALI inside schedule_run, in this thread
                while True:
                    try:
                        hb = feed.next()
                    except Exception as e:  # not DALI's: raised in plan order, after the batches before it
                        order.append((e, None))
                        feed.end()
                        raise StopIteration from None
                    if hb is None:
                        raise StopIteration
                    live = [s for s in hb.slots if s is not None]
                    order.append((hb, stream if live else None))
                    if live:
                        return _inputs(live, self.names)

            stream.pipe = self._build(source, prefetch)
            schedule(stream)
            return stream

        def schedule(stream: _Stream) -> None:
            try:
                stream.pipe.schedule_run()
            except Exception as e:  # a synchronous pipeline runs (and fails) in here
                stream.alive, stream.error = False, _first_line(e)

        streams = [new_stream() for _ in range(max(1, self.cfg.dali_pipelines))]
        try:
            while order:
                hb, stream = order.popleft()
                if isinstance(hb, Exception):
                    raise hb
                live = [i for i, s in enumerate(hb.slots) if s is not None]
                if stream is None:
                    batch = assemble_dense(self.cfg, self.train, hb.slots, [], None, self.dtype, self.out_device)
                    yield batch, list(hb.skipped), hb.index
                    continue
                out = None
                if stream.alive:
                    try:
                        (tl,) = stream.pipe.outputs()
                        out = self._to_torch(tl)
                    except Exception as e:
                        stream.alive, stream.error = False, _first_line(e)
                if out is not None:
                    yield (assemble_dense(self.cfg, self.train, hb.slots, live, out, self.dtype, self.out_device),
                           list(hb.skipped), hb.index)
                else:
                    yield (*self.rescue_batch(hb, stream.error), hb.index)
                k = streams.index(stream) if stream in streams else -1
                if k >= 0 and stream.alive:
                    schedule(stream)  # keep it `prefetch` batches ahead
                elif k >= 0:  # replace the dead pipeline; the batches it still owed are rescued above
                    stream.pipe = None
                    self.rebuilds += 1
                    streams[k] = new_stream()
        finally:
            for stream in streams:
                stream.pipe = None

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
            ahead = self.cfg.dali_pipelines * max(1, self.cfg.dali_prefetch) + self.cfg.dali_read_threads
            feed = _ReadAhead(lambda reader, b: prepare_batch(self.cfg, reader, b, batches[b], self.train, epoch),
                              lambda: ShardReader(self.root, self.table), range(start, len(batches)),
                              self.cfg.dali_read_threads, ahead)
            batches_out = self._decode_in_order(feed)
            try:
                for batch, skipped, b in batches_out:
                    batch["_index"], batch["_skipped"] = b, skipped
                    if not put(batch):
                        return
                put(None)
            except BaseException as e:  # hand any error to the consumer instead of dying silently
                put(e)
            finally:
                batches_out.close()  # drops the pipelines before their source goes
                feed.close()

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
