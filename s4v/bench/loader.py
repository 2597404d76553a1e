"""`s4v bench loader`: clips/s of each input engine available on this machine, over real shards.

Every row reads the same split with the same config; the ratio column is relative to the first
row measured in this run. The first batch of each row (pipeline build, worker start) is not timed.
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
    import torch

    from s4v.data.loader import build_loader

    loader = build_loader(cfg, split, train=train, device=device)
    it = iter(loader)
    first = next(it)
    clips = 0
    t0 = time.perf_counter()
    for i, b in enumerate(it):
        if i >= batches:
            break
        v = b["video"]
        if v.is_cuda:
            torch.cuda.synchronize(v.device)
        clips += v.shape[0] * (v.shape[1] if v.dim() == 6 else 1)
    dt = time.perf_counter() - t0
    del first, it
    return (clips / dt if dt > 0 else 0.0), clips, loader.skipped


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="s4v bench loader", description=__doc__.splitlines()[0])
    add_arguments(p)
    a = p.parse_args(argv)
    index = SplitIndex.load(a.shards, a.split)
    base = DataConfig(root=a.shards, batch_size=a.batch_size, num_frames=a.num_frames, num_workers=a.workers,
                      sampling=a.sampling, min_shards_per_reader=0)
    wanted = None if a.engines == "auto" else set(a.engines.split(","))
    need = a.batches + 1
    avail = index.num_samples // a.batch_size
    if avail < need:
        print(f"note: {index.num_samples} samples give {avail} batches; timing {max(0, avail - 1)}")
    print(f"split {a.split!r}: {index.num_samples} clips in {len(index.shards)} shards, codec {index.codec}; "
          f"batch {a.batch_size} x {a.num_frames} frames, {'eval' if a.eval else 'train'} mode, {a.workers} workers")
    print(f"{'engine':<10} {'clips/s':>9} {'ratio':>7} {'clips':>6} {'skipped':>8}")
    ref = None
    for name, loader, dev in _engines(index.codec):
        if wanted is not None and name not in wanted:
            continue
        if dev is not None and dev.startswith("skip"):
            print(f"{name:<10} {'-':>9} {'-':>7} {'-':>6} {'-':>8}   ({dev[6:]})")
            continue
        cfg = dataclasses.replace(base, loader=loader, device=dev or "cpu")
        rate, clips, skipped = measure(cfg, a.split, not a.eval, a.batches, "cuda" if dev == "gpu" else "cpu")
        ref = ref or rate
        print(f"{name:<10} {rate:9.1f} {rate / ref if ref else 0:7.2f} {clips:6d} {skipped:8d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
