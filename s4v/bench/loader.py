"""`s4v bench loader`: clips/s of each input engine available on this machine, over real shards.

Every row reads the same split with the same config; the ratio column is relative to the first
row measured in this run. The first batch of each row (pipeline build, worker start) is not timed.
`--baseline` adds, before each DALI row, the engine's old settings (one synchronous pipeline, no
read-ahead, float32) in the same process, and `--repeat N` measures every row N times, interleaved,
and reports medians: on a shared machine only ratios measured side by side mean anything.
The timed batches end at the last one counted (no batch beyond it, no worker shutdown). Reference rows
(`pyav-plain`, `torchcodec`: a plain decode of the same frames with a uint8 crop/resize and no s4v
code, s4v/bench/loader_reference.py) follow the PyAV row, with the loader's rate over theirs.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time
from typing import Optional

from s4v.data.config import DataConfig
from s4v.data.format import SplitIndex


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="folder with {split}-*.tar and {split}-index.json")
    p.add_argument("--split", default="train")
    p.add_argument("--batches", type=int, default=10, help="timed batches per engine")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="pyav workers / DALI threads")
    p.add_argument("--sampling", choices=["segment", "uniform"], default="segment")
    p.add_argument("--eval", action="store_true", help="eval mode (centre crop, fixed frames)")
    p.add_argument("--engines", default="auto", help="comma list of pyav,dali-cpu,dali-gpu (auto: all usable)")
    p.add_argument("--image-size", type=int, default=224, help="output frame size")
    p.add_argument("--pipelines", type=int, default=1, help="DALI pipelines (data.dali_pipelines)")
    p.add_argument("--prefetch", type=int, default=2, help="DALI batches ahead per pipeline (data.dali_prefetch)")
    p.add_argument("--read-threads", type=int, default=2, help="DALI read-ahead threads (data.dali_read_threads)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="DALI output dtype")
    p.add_argument("--baseline", action="store_true", help="also the old DALI settings, for a before/after ratio")
    p.add_argument("--repeat", type=int, default=1, help="measure every row this many times (medians reported)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the reference rows (plain PyAV / torchcodec decode-and-crop of the same frames)")


def _engines(codec: str) -> list[tuple[str, str, Optional[str]]]:
    """(name, loader, dali device or reason to skip) for every engine on this machine."""
    import torch

    rows = [("pyav", "pyav", None)]
    try:  # look for DALI without importing it (it is imported only by s4v/data/dali_pipeline.py)
        has_dali = importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        has_dali = False
    if not has_dali:
        return rows + [("dali-gpu", "dali", "skip: DALI not installed")]
    if torch.cuda.is_available():
        rows.append(("dali-gpu", "dali", "gpu"))
    if codec.lower() in ("vp9", "vp8", "mjpeg"):
        rows.append(("dali-cpu", "dali", "cpu"))
    else:
        rows.append(("dali-cpu", "dali", f"skip: DALI's CPU decoder cannot decode {codec}"))
    return rows


def measure(cfg: DataConfig, split: str, train: bool, batches: int, device: str) -> tuple[float, int, int]:
    """(clips/s, clips timed, skipped samples) over `batches` batches after one untimed batch."""
    from s4v.data.loader import build_loader

    loader = build_loader(cfg, split, train=train, device=device)
    rate, clips = time_batches(loader, batches)
    return rate, clips, loader.skipped


def time_batches(loader, batches: int) -> tuple[float, int]:
    """(clips/s, clips) of `batches` batches after one untimed one. The clock stops at the last timed
    batch: no batch beyond it is waited for, and the loader's end (worker shutdown) is not timed."""
    import torch

    it = iter(loader)
    clips, n = 0, 0
    try:
        next(it)  # pipeline build, worker start
        t0 = t1 = time.perf_counter()
        for b in (it if batches > 0 else ()):
            v = b["video"]
            if v.is_cuda:
                torch.cuda.synchronize(v.device)
            clips += v.shape[0] * (v.shape[1] if v.dim() == 6 else 1)
            n, t1 = n + 1, time.perf_counter()
            if n >= batches:
                break
    except StopIteration:
        return 0.0, 0
    finally:
        close = getattr(it, "close", None) or getattr(it, "_shutdown_workers", None)
        if close is not None:
            close()
    return (clips / (t1 - t0) if t1 > t0 else 0.0), clips


def measure_reference(cfg: DataConfig, split: str, train: bool, batches: int, decoder: str) -> tuple[float, int, int]:
    """`measure` for a reference row (s4v/bench/loader_reference.py): same frames, no s4v code."""
    from s4v.bench.loader_reference import reference_loader

    rate, clips = time_batches(reference_loader(cfg, split, train, decoder), batches)
    return rate, clips, 0


OLD_DALI = dict(dali_pipelines=1, dali_prefetch=1, dali_read_threads=0, output_dtype="float32")


def main(argv: Optional[list[str]] = None) -> int:
    import statistics

    p = argparse.ArgumentParser(prog="s4v bench loader", description=__doc__.splitlines()[0])
    add_arguments(p)
    a = p.parse_args(argv)
    index = SplitIndex.load(a.shards, a.split)
    base = DataConfig(root=a.shards, batch_size=a.batch_size, num_frames=a.num_frames, num_workers=a.workers,
                      sampling=a.sampling, min_shards_per_reader=0, image_size=a.image_size,
                      resize_short=max(a.image_size, round(a.image_size * 8 / 7)),
                      resize_fixed=(a.image_size, a.image_size), dali_pipelines=a.pipelines,
                      dali_prefetch=a.prefetch, dali_read_threads=a.read_threads, output_dtype=a.dtype)
    wanted = None if a.engines == "auto" else set(a.engines.split(","))
    need = a.batches + 1
    avail = index.num_samples // a.batch_size
    if avail < need:
        print(f"note: {index.num_samples} samples give {avail} batches; timing {max(0, avail - 1)}")
    print(f"split {a.split!r}: {index.num_samples} clips in {len(index.shards)} shards, codec {index.codec}; "
          f"batch {a.batch_size} x {a.num_frames} frames of {a.image_size}px, {'eval' if a.eval else 'train'} mode, "
          f"{a.workers} workers; DALI {a.pipelines} pipelines x {a.prefetch} ahead, {a.read_threads} read threads, "
          f"{a.dtype}; {a.repeat} repeat(s), medians")
    rows = []  # (name, config, device) in print order
    for name, loader, dev in _engines(index.codec):
        if wanted is not None and name not in wanted:
            continue
        if dev is not None and dev.startswith("skip"):
            rows.append((name, dev, None))
            continue
        cfg = dataclasses.replace(base, loader=loader, device=dev or "cpu")
        if a.baseline and loader == "dali":
            rows.append((f"{name}-old", dataclasses.replace(cfg, **OLD_DALI), dev))
        rows.append((name, cfg, dev))
    if not a.no_reference and any(r[0] == "pyav" for r in rows):
        from s4v.bench.loader_reference import torchcodec_problem

        problem = torchcodec_problem()
        rows.append(("pyav-plain", dataclasses.replace(base, loader="pyav"), "ref:pyav"))
        rows.append(("torchcodec", f"skip: {problem}" if problem else dataclasses.replace(base, loader="pyav"),
                     "ref:torchcodec"))
    results: dict[str, list[tuple[float, int, int]]] = {}
    for _ in range(max(1, a.repeat)):  # interleaved, so a busy moment hits every row alike
        for name, cfg, dev in rows:
            if not isinstance(cfg, str):
                results.setdefault(name, []).append(
                    measure_reference(cfg, a.split, not a.eval, a.batches, dev[4:]) if str(dev).startswith("ref:")
                    else measure(cfg, a.split, not a.eval, a.batches, "cuda" if dev == "gpu" else "cpu"))
    print(f"{'engine':<13} {'clips/s':>9} {'ratio':>7} {'clips':>6} {'skipped':>8}")
    ref = None
    for name, cfg, dev in rows:
        if isinstance(cfg, str):
            print(f"{name:<13} {'-':>9} {'-':>7} {'-':>6} {'-':>8}   ({cfg[6:]})")
            continue
        runs = results[name]
        rate = statistics.median(r for r, _, _ in runs)
        ref = ref or rate
        print(f"{name:<13} {rate:9.1f} {rate / ref if ref else 0:7.2f} {runs[0][1]:6d} {max(r[2] for r in runs):8d}")
    for name, cfg, dev in rows:
        if f"{name}-old" in results:
            ratios = [new[0] / old[0] for new, old in zip(results[name], results[f"{name}-old"]) if old[0] > 0]
            spread = f" (runs: {', '.join(f'{r:.2f}' for r in ratios)})" if len(ratios) > 1 else ""
            print(f"{name} speed-up over the old settings: {statistics.median(ratios):.2f}x{spread}")
    for name in ("pyav-plain", "torchcodec"):  # the PyAV loader against plain decode-and-crop, run by run
        ratios = [s4v[0] / r[0] for s4v, r in zip(results.get("pyav", []), results.get(name, [])) if r[0] > 0]
        if ratios:
            spread = f" (runs: {', '.join(f'{r:.2f}' for r in ratios)})" if len(ratios) > 1 else ""
            print(f"s4v pyav / {name}: {statistics.median(ratios):.2f}x{spread}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
