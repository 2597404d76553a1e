"""`s4v bench throughput`: training clips/s and step time of s4v models and baselines, next to the
data loaders' clips/s, so one can see which one limits.

A training step is forward + backward + AdamW step on random clips (random weights: speed does not
depend on them). On a GPU the model FLOPs utilisation is reported: FLOPs of the step (backbone
forward, side network forward and backward counted as 3x forward) over step time and the GPU's dense
bf16 peak (`--peak-tflops`, default H100/H200 SXM 989). With `--shards`, `s4v bench loader`'s
measurement runs on the same batch size and frame count.
"""
from __future__ import annotations

import argparse
import functools
import gc
import time
from typing import Optional

import torch
from torch import nn

from s4v.bench.memory import OFFICIAL_LIKE, baseline_row, build, train_step


@functools.lru_cache(maxsize=None)
def train_flops_per_clip(model_name: str, frames: int) -> Optional[float]:
    """FLOPs of one training step per clip (multiply-adds x 2): backbone forward + 3 x side forward;
    None for a baseline (`baseline:...`), which the count does not cover."""
    if model_name.startswith("baseline:"):
        return None
    import s4v
    from s4v.model.flops import count_flops

    m = s4v.create_model(model_name, 174, frames, device="meta")
    backbone, side = count_flops(m, frames)  # GMACs per view
    return 2e9 * (backbone + 3 * side)


def time_steps(model: nn.Module, video: torch.Tensor, precision: str, steps: int, warmup: int = 1) -> float:
    """Seconds per training step (mean over `steps` after `warmup`)."""
    device = video.device.type
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=device == "cuda")
    label = torch.zeros(video.shape[0], dtype=torch.long, device=video.device)

    for _ in range(warmup):
        train_step(model, video, label, opt, precision)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, video, label, opt, precision)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


VARIANTS = {"official-like": (OFFICIAL_LIKE, False), "default": ({}, False),
            "mlp_recompute=fc1": ({"side.mlp_recompute": "fc1"}, False), "default+ckpt": ({}, True)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="s4v bench throughput", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="s4v_b16", help="comma list of s4v model names")
    p.add_argument("--variants", default="official-like,default,default+ckpt",
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--baselines", default="", help="comma list of full-finetune,st-adapter,linear-probe")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak for MFU")
    p.add_argument("--shards", default=None, help="also measure the loaders on these shards")
    p.add_argument("--loader-batches", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    from s4v.model.specs import get_spec

    print(f"device {a.device} ({torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads); {a.frames} frames, batch {a.batch}, {a.precision}")
    print(f"{'model':<40} {'step s':>8} {'clips/s':>8} {'ratio':>6} {'TFLOP/s':>8} {'MFU':>6}")
    ref = None
    for model_name in a.models.split(","):
        size = get_spec(model_name).backbone.image_size
        video = torch.randn(a.batch, a.frames, 3, size, size, device=a.device)
        todo = [(f"{model_name} {v}", model_name, *VARIANTS[v]) for v in a.variants.split(",") if v]
        todo += [baseline_row(k, model_name) for k in a.baselines.split(",") if k]
        for label, name, overrides, ckpt in todo:
            try:
                model = build(name, a.frames, a.precision, a.device, overrides)
                if ckpt:
                    model.set_grad_checkpointing(True)
                dt = time_steps(model, video, a.precision, a.steps)
            except torch.OutOfMemoryError:
                print(f"{label:<40} OOM")
                continue
            except Exception as err:  # one failing row must not kill the others
                print(f"{label:<40} error: {type(err).__name__}: {err}")
                continue
            finally:
                model = None
                gc.collect()
            rate = a.batch / dt
            ref = ref or rate
            flops = train_flops_per_clip(name, a.frames)
            tflops = f"{flops * a.batch / dt / 1e12:8.2f}" if flops else f"{'-':>8}"
            mfu = (f"{flops * a.batch / dt / (a.peak_tflops * 1e12):6.1%}" if flops and a.device == "cuda"
                   else f"{'-':>6}")
            print(f"{label:<40} {dt:8.3f} {rate:8.2f} {rate / ref:6.2f} {tflops} {mfu}")
    if a.shards:
        import dataclasses

        from s4v.bench.loader import measure
        from s4v.data.config import DataConfig

        cfg = DataConfig(root=a.shards, batch_size=a.batch, num_frames=a.frames, num_workers=a.workers,
                         min_shards_per_reader=0)
        rate, clips, skipped = measure(dataclasses.replace(cfg, loader="pyav", device="cpu"), "train", True,
                                       a.loader_batches, "cpu")
        print(f"{'loader pyav (' + str(a.workers) + ' workers)':<40} {'-':>8} {rate:8.2f}   "
              f"({clips} clips, {skipped} skipped; the slower of model and loader limits training)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
