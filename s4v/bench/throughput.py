"""`s4v bench throughput`: training clips/s and step time of s4v models and baselines, next to the
data loaders' clips/s, so one can see which one limits.

A training step is forward + backward + AdamW step on random clips (random weights: speed does not
depend on them). On a GPU the model FLOPs utilisation is reported: FLOPs of the step (backbone
forward, side network forward and backward counted as 3x forward) over step time and the GPU's dense
bf16 peak (`--peak-tflops`, default H100/H200 SXM 989). With `--shards`, `s4v bench loader`'s
measurement runs on the same batch size and frame count, and the steps train on the loader's
batches (`--loader`), so waiting for data is part of the step.

Every row splits the step into shares: waiting for data, the frozen tower's forward, the side
network's forward (+ loss), its backward, and the optimizer step (CUDA events on a GPU, so the
marks add no sync inside the step). `--compile none,side,side+tower` measures each row eager and
compiled (`train.compile`), with the compiled row's ratio to eager.
"""
from __future__ import annotations

import argparse
import functools
import gc
import time
from typing import Optional

import torch
from torch import nn

from s4v.bench.memory import OFFICIAL_LIKE, baseline_row, build


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


PHASES = ("data", "frozen", "side_fwd", "side_bwd", "optim")  # the shares reported per row


class PhaseClock:
    """Marks phase boundaries: CUDA events on a GPU (no sync inside the step), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def spans(self) -> list[float]:
        """Seconds between consecutive marks (synchronises once on a GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def phased_step(model: nn.Module, video: torch.Tensor, label: torch.Tensor, opt: torch.optim.Optimizer,
                precision: str, clock: PhaseClock) -> None:
    """One training step with a clock mark after the frozen forward, the side forward (+ loss), the
    backward and the optimizer step. Models without a frozen tower + side network (baselines) mark
    forward and backward only (their forward counts as `side_fwd`)."""
    from s4v.bench.memory import _autocast

    split = all(hasattr(model, k) for k in ("backbone", "side", "head"))
    with _autocast(video.device.type, precision):
        if split:
            taps = model.backbone(video.flatten(0, 1))  # no_grad inside: the frozen tower
            clock.mark()
            logits = model.head(model.side(video, taps), video.shape[0])
        else:
            clock.mark()
            logits = model(video)
        loss = nn.functional.cross_entropy(logits.float(), label)
    clock.mark()
    loss.backward()
    clock.mark()
    opt.step()
    opt.zero_grad(set_to_none=True)
    clock.mark()


def time_steps(model: nn.Module, batches, precision: str, steps: int, warmup: int = 1) -> tuple[float, dict]:
    """(seconds per training step, share of the step per phase of PHASES) over `steps` after `warmup`.

    `batches`: an iterator of (video, label); the time spent in `next(batches)` is the data wait."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    video, _ = next(batches)
    device = video.device
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=device.type == "cuda")
    for _ in range(warmup):  # torch.compile compiles here
        video, label = next(batches)
        phased_step(model, video, label, opt, precision, PhaseClock(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    totals = dict.fromkeys(PHASES, 0.0)
    t0 = time.perf_counter()
    for _ in range(steps):
        w0 = time.perf_counter()
        video, label = next(batches)
        totals["data"] += time.perf_counter() - w0
        clock = PhaseClock(device)
        clock.mark()
        phased_step(model, video, label, opt, precision, clock)
        spans = clock.spans()
        if len(spans) == 4:
            for k, dt in zip(PHASES[1:], spans):
                totals[k] += dt
        else:
            for k, dt in zip(PHASES[2:], [0.0] + spans):
                totals[k] += dt
    if device.type == "cuda":
        torch.cuda.synchronize()
    step = (time.perf_counter() - t0) / steps
    total = sum(totals.values()) or 1.0
    return step, {k: v / total for k, v in totals.items()}


def random_batches(batch: int, frames: int, size: int, device: str):
    """Endless (video, label) of one random batch (no data wait)."""
    video = torch.randn(batch, frames, 3, size, size, device=device)
    label = torch.zeros(batch, dtype=torch.long, device=device)
    while True:
        yield video, label


def loader_batches(shards: str, engine: str, batch: int, frames: int, size: int, workers: int, device: str):
    """Endless (video, label) from a loader over `shards` (engine pyav, dali-cpu or dali-gpu), epoch after epoch."""
    import dataclasses

    from s4v.data.config import DataConfig
    from s4v.data.loader import build_loader

    cfg = DataConfig(root=shards, batch_size=batch, num_frames=frames, num_workers=workers, min_shards_per_reader=0,
                     image_size=size, resize_short=max(size, round(size * 8 / 7)), num_classes=None)
    cfg = dataclasses.replace(cfg, loader="pyav" if engine == "pyav" else "dali",
                              device="gpu" if engine == "dali-gpu" else "cpu")
    loader = build_loader(cfg, "train", train=True, device=device)
    while True:
        for b in loader:
            yield b["video"].to(device, non_blocking=True), b["label"].clamp(0, 173).to(device, non_blocking=True)


VARIANTS = {"official-like": (OFFICIAL_LIKE, False), "default": ({}, False),
            "mlp_recompute=fc1": ({"side.mlp_recompute": "fc1"}, False), "default+ckpt": ({}, True)}


def main(argv: Optional[list[str]] = None) -> int:
    import statistics

    from s4v.train.compile import compile_model

    p = argparse.ArgumentParser(prog="s4v bench throughput", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="s4v_b16", help="comma list of s4v model names")
    p.add_argument("--variants", default="official-like,default,default+ckpt",
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--baselines", default="", help="comma list of full-finetune,st-adapter,linear-probe")
    p.add_argument("--compile", default="none", help="comma list of none,side,side+tower (train.compile); "
                                                     "each variant is measured with each")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens here)")
    p.add_argument("--repeat", type=int, default=1, help="time every row this many times, interleaved (medians)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak for MFU")
    p.add_argument("--shards", default=None, help="train on batches of these shards (the data column is the wait "
                                                  "for them), and measure the loader alone too")
    p.add_argument("--loader", default="dali-cpu", choices=["pyav", "dali-cpu", "dali-gpu"],
                   help="engine feeding the steps with --shards")
    p.add_argument("--loader-batches", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    from s4v.model.specs import get_spec

    print(f"device {a.device} ({torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads); {a.frames} frames, batch {a.batch}, {a.precision}; "
          f"data: {a.loader + ' on ' + a.shards if a.shards else 'one random batch (no wait)'}; "
          f"{a.repeat} repeat(s), medians")
    shares = "  ".join(f"{k + '%':>8}" for k in PHASES)
    print(f"{'model':<44} {'step s':>8} {'clips/s':>8} {'ratio':>6} {'TFLOP/s':>8} {'MFU':>6}  {shares}")
    rows = []  # (label, name, overrides, ckpt, compile mode, model or error)
    for model_name in a.models.split(","):
        size = get_spec(model_name).backbone.image_size
        todo = [(f"{model_name} {v}", model_name, *VARIANTS[v]) for v in a.variants.split(",") if v]
        todo += [baseline_row(k, model_name) for k in a.baselines.split(",") if k]
        for label, name, overrides, ckpt in todo:
            for mode in a.compile.split(","):
                rows.append((label + ("" if mode == "none" else f" compile={mode}"), name, overrides, ckpt, mode, size))
    results: dict[str, list] = {}
    feeds: dict[int, object] = {}
    for _ in range(max(1, a.repeat)):  # interleaved, so a busy moment of a shared machine hits every row alike
        for label, name, overrides, ckpt, mode, size in rows:
            if isinstance(results.get(label), str):
                continue
            model = None
            try:
                if size not in feeds:
                    feeds[size] = (loader_batches(a.shards, a.loader, a.batch, a.frames, size, a.workers, a.device)
                                   if a.shards else random_batches(a.batch, a.frames, size, a.device))
                torch.manual_seed(0)
                model = build(name, a.frames, a.precision, a.device, overrides)
                if ckpt:
                    model.set_grad_checkpointing(True)
                if mode != "none":
                    compile_model(model, mode)
                results.setdefault(label, []).append(time_steps(model, feeds[size], a.precision, a.steps, a.warmup))
            except torch.OutOfMemoryError:
                results[label] = "OOM"
            except Exception as err:  # one failing row must not kill the others
                results[label] = f"error: {type(err).__name__}: {err}"
            finally:
                model = None
                gc.collect()
    ref = None
    eager: dict[str, float] = {}
    for label, name, overrides, ckpt, mode, size in rows:
        got = results.get(label)
        if isinstance(got, str):
            print(f"{label:<44} {got}")
            continue
        dt = statistics.median(g[0] for g in got)
        share = {k: statistics.median(g[1][k] for g in got) for k in PHASES}
        rate = a.batch / dt
        ref = ref or rate
        base_label = label.split(" compile=")[0]
        if mode == "none":
            eager[base_label] = rate
        flops = train_flops_per_clip(name, a.frames)
        tflops = f"{flops * a.batch / dt / 1e12:8.2f}" if flops else f"{'-':>8}"
        mfu = (f"{flops * a.batch / dt / (a.peak_tflops * 1e12):6.1%}" if flops and a.device == "cuda"
               else f"{'-':>6}")
        cells = "  ".join(f"{share[k]:8.1%}" for k in PHASES)
        vs = f"   {rate / eager[base_label]:.2f}x eager" if mode != "none" and base_label in eager else ""
        print(f"{label:<44} {dt:8.3f} {rate:8.2f} {rate / ref:6.2f} {tflops} {mfu}  {cells}{vs}")
    if a.shards:
        import dataclasses

        from s4v.bench.loader import measure
        from s4v.data.config import DataConfig

        size = rows[0][5] if rows else 224
        cfg = DataConfig(root=a.shards, batch_size=a.batch, num_frames=a.frames, num_workers=a.workers,
                         min_shards_per_reader=0, image_size=size, resize_short=max(size, round(size * 8 / 7)))
        cfg = dataclasses.replace(cfg, loader="pyav" if a.loader == "pyav" else "dali",
                                  device="gpu" if a.loader == "dali-gpu" else "cpu")
        rate, clips, skipped = measure(cfg, "train", True, a.loader_batches, a.device)
        print(f"{'loader ' + a.loader + ' alone (' + str(a.workers) + ' workers)':<44} {'-':>8} {rate:8.2f}   "
              f"({clips} clips, {skipped} skipped; the slower of model and loader limits training)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
