"""`s4v bench memory`: training-step memory of s4v models and of baselines in the same harness.

Every row splits one training step's memory into weights, gradients, optimizer state (AdamW: two
fp32 moments per trainable parameter) and activations. Activations are the exact bytes of the
tensors the autograd graph keeps for backward after the forward pass, measured with
`torch.autograd.graph.saved_tensors_hooks`: every storage is counted once, parameters are excluded
(they are weights), and everything else the graph holds is counted, the backbone tokens the taps keep
included. The inputs a checkpointed segment keeps for its recomputation are counted too. Bytes are
attributed to the innermost module that saved them (MLP, attention, tap norms, ...). On a GPU the
CUDA peak of a full forward + backward + optimizer step is measured as well.

Ratios are relative to the row of `s4v_b16`-style default settings of the same model in this run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import time
from typing import Callable, Optional

import torch
from torch import nn

MiB = 1024 ** 2

# The official Side4Video model (s4v_b16, 8 frames) measured the same way: bytes saved for backward per
# clip (given in the issue; the official code cannot run here).
OFFICIAL_B16_MIB = {"fp32": 580.0, "bf16": 370.0}
# Paper Table 2 (SSv2, 8 frames; batch 32 for B/16, 16 for L/14), training memory in GB.
PAPER_GB = {("B/16", "Side4Video"): 18.8, ("B/16", "ST-Adapter"): 28.8, ("B/16", "AIM"): 35.2,
            ("B/16", "Side4Video light"): 8.9, ("L/14", "Side4Video"): 37.0, ("L/14", "ST-Adapter"): 51.4,
            ("L/14", "AIM"): 64.3, ("L/14", "Side4Video light"): 15.3}
CATEGORIES = ("mlp", "attention", "tap_norm", "tap_proj", "conv", "bn", "stem", "head", "backbone", "adapter",
              "ckpt_inputs", "other", "weight_casts")


def categorize(path: str, module: nn.Module) -> Optional[str]:
    """Memory category of a module from its qualified name (None: inherit the enclosing one)."""
    leaf = path.rsplit(".", 1)[-1]
    parts = path.split(".")
    if "taps" in parts:  # a fused tap keeps its input (the backbone token) under the Tap itself
        return "tap_proj" if leaf == "proj" else "tap_norm"
    if "stem" in parts:
        return "stem"
    if parts[0] == "head":
        return "bn" if leaf == "bn" else "head"
    if leaf in ("bn1", "bn2"):
        return "bn"
    if leaf == "temporal":
        return "conv"
    if leaf in ("attn", "ln"):
        return "attention"
    if leaf == "mlp":
        return "mlp"
    if leaf == "adapter" or leaf.startswith("adapter"):
        return "adapter"
    if parts[0] in ("backbone", "tower"):
        return "backbone"
    return None


class SavedTensorTracker:
    """Counts the bytes autograd saves for backward while active, once per storage, by category.

    Parameters (and buffers) of `model` are excluded. The tracker keeps a reference to every storage it
    saw, so an address cannot be reused by another tensor during the measurement; that changes nothing,
    because saved tensors live until backward anyway.
    """

    def __init__(self, model: nn.Module, categorize_fn: Callable[[str, nn.Module], Optional[str]] = categorize):
        self.model = model
        self.categorize = categorize_fn
        self.exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())
                        if t.device.type != "meta"}
        self.seen: dict[int, tuple[object, int, str]] = {}
        # autocast's low-precision copies of weights: once per step, not per clip
        self.param_shapes = {(tuple(p.shape), p.dtype) for p in model.parameters() if p.requires_grad}
        self.stack: list[str] = ["other"]
        self._handles: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    # -- hooks --------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.note(t, self.stack[-1])
        return t

    def note(self, t: torch.Tensor, category: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self.exclude or ptr in self.seen or st.nbytes() == 0:
            return
        if (t.dtype in (torch.float16, torch.bfloat16) and (tuple(t.shape), torch.float32) in self.param_shapes
                and t.numel() * t.element_size() == st.nbytes()):
            category = "weight_casts"
        self.seen[ptr] = (st, st.nbytes(), category)

    def _enter(self, cat):
        def pre(module, args):
            self.stack.append(cat or self.stack[-1])
        return pre

    def _exit(self, module, args, out):
        self.stack.pop()

    # -- context ------------------------------------------------------------------------------
    def __enter__(self) -> "SavedTensorTracker":
        for path, mod in self.model.named_modules():
            if not path:
                continue
            self._handles.append(mod.register_forward_pre_hook(self._enter(self.categorize(path, mod))))
            self._handles.append(mod.register_forward_hook(self._exit))
        import s4v.model.layers as layers

        self._orig_ckpt = layers.checkpoint

        def counting_checkpoint(fn, *args, **kwargs):  # a checkpointed segment keeps its inputs
            for a in args:
                if isinstance(a, torch.Tensor):
                    self.note(a, "ckpt_inputs")
            return self._orig_ckpt(fn, *args, **kwargs)

        layers.checkpoint = counting_checkpoint
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        import s4v.model.layers as layers

        layers.checkpoint = self._orig_ckpt
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- results ------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Activation bytes (the weight casts of autocast excluded)."""
        return sum(n for _, n, c in self.seen.values() if c != "weight_casts")

    @property
    def casts(self) -> int:
        return sum(n for _, n, c in self.seen.values() if c == "weight_casts")

    def by_category(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, n, cat in self.seen.values():
            out[cat] = out.get(cat, 0) + n
        return out

    def release(self) -> None:
        self.seen.clear()


@dataclasses.dataclass
class Row:
    name: str  # row label
    model: str  # model or baseline name
    batch: int
    frames: int
    precision: str  # "fp32" or "bf16" (autocast; frozen backbone weights in bf16)
    trainable: int = 0
    weights: int = 0  # bytes of all parameters (frozen + trainable)
    grads: int = 0
    optim: int = 0
    saved: int = 0  # bytes saved for backward (the whole batch), autocast's weight copies excluded
    casts: int = 0  # autocast's low-precision weight copies kept for backward (once per step)
    categories: dict = dataclasses.field(default_factory=dict)
    step_s: float = float("nan")
    cuda_peak: Optional[int] = None
    cuda_reserved: Optional[int] = None  # the allocator's reserved peak in the timed step
    peak_sites: Optional[dict] = None  # CUDA: what is live at the step's peak (s4v.bench.cuda_peak)
    peak_base: int = 0  # CUDA: bytes allocated when the timed step began
    peak_op: Optional[dict] = None  # the operator call where the step peaks (s4v.bench.op_peak)
    note: str = ""

    @property
    def saved_per_clip_mib(self) -> float:
        return self.saved / self.batch / MiB

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optim + self.saved + self.casts


def _autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, video: torch.Tensor, label: torch.Tensor, opt: torch.optim.Optimizer,
               precision: str) -> None:
    """One training step of the benches: forward (under autocast for bf16), cross-entropy, backward, step."""
    with _autocast(video.device.type, precision):
        loss = nn.functional.cross_entropy(model(video).float(), label)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(model: nn.Module, video: torch.Tensor, precision: str = "fp32", name: str = "",
            model_name: str = "", step: bool = False, label: Optional[torch.Tensor] = None,
            categorize_fn: Optional[Callable[[str, nn.Module], Optional[str]]] = None,
            trace_peak: bool = False) -> Row:
    """Saved-for-backward bytes of one training forward of `model` on `video` (and, with `step`, the time
    and, on CUDA, the peak memory of forward + backward + AdamW step; with `trace_peak`, one more step
    says in which operator call the step peaks and which calls need the most transient memory, and on
    CUDA also what is live at that peak, from the allocator's trace)."""
    device = video.device.type
    model.train()
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    row = Row(name or model_name, model_name, video.shape[0], video.shape[1], precision,
              trainable=sum(p.numel() for p in trainable),
              weights=sum(p.numel() * p.element_size() for p in params),
              grads=sum(p.numel() * p.element_size() for p in trainable),
              optim=sum(2 * p.numel() * 4 for p in trainable))
    if label is None:
        label = torch.zeros(video.shape[0], dtype=torch.long, device=video.device)
    if categorize_fn is None:  # the categories of the model's own family
        from s4v.bench import baselines

        categorize_fn = baselines.categorize if isinstance(model, baselines.FrameMeanClassifier) else categorize
    tracker = SavedTensorTracker(model, categorize_fn)
    with tracker, _autocast(device, precision):
        out = model(video)
    row.saved, row.casts, row.categories = tracker.total, tracker.casts, tracker.by_category()
    tracker.release()
    del out
    gc.collect()
    if step:
        opt = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
        for i in range(3 if trace_peak else 2):  # warm-up step, the timed one, [a traced one]
            tracing = i == 2
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            recorder = contextlib.nullcontext()
            if tracing:
                from s4v.bench.op_peak import LiveTensorCounters, OpPeakRecorder

                before_step = params + list(model.buffers()) + [video, label] + [
                    t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
                recorder = OpPeakRecorder(None if device == "cuda" else LiveTensorCounters(before_step))
                if device == "cuda":
                    from s4v.bench.cuda_peak import start_recording

                    row.peak_base = start_recording()
            t0 = time.perf_counter()
            with recorder:
                train_step(model, video, label, opt, precision)
            if device == "cuda":
                torch.cuda.synchronize()
            if tracing:  # a step of its own: recording slows it, so it is not the timed one
                row.peak_op = recorder.report()
                if device == "cuda":
                    from s4v.bench.cuda_peak import stop_recording

                    row.peak_sites = stop_recording()
                continue
            row.step_s = time.perf_counter() - t0
            if device == "cuda":
                row.cuda_peak = torch.cuda.max_memory_allocated()
                row.cuda_reserved = torch.cuda.max_memory_reserved()
        del opt
    return row


# -- model rows -------------------------------------------------------------------------------------

# Settings that reproduce what the official model keeps for backward (each saving switched off).
OFFICIAL_LIKE = {"side.attention": "math", "side.fused_taps": False, "side.fused_norms": False,
                 "side.mlp_recompute": "none"}


def s4v_variants() -> list[tuple[str, dict, bool]]:
    """(row label, s4v overrides, grad checkpointing): from the official-like settings, the savings
    switched on one after the other (each row adds one), then beyond the defaults."""
    off = dict(OFFICIAL_LIKE)
    rows = [("official-like", dict(off), False)]
    for key, value, label in (("side.attention", "sdpa", "+sdpa"), ("side.fused_taps", True, "+fused_taps"),
                              ("side.fused_norms", True, "+fused_norms")):
        off[key] = value
        rows.append((label, dict(off), False))
    rows += [("default", {}, False),  # = + mlp_recompute=gelu
             ("mlp_recompute=fc1", {"side.mlp_recompute": "fc1"}, False),
             ("default+ckpt", {}, True)]
    return rows


def baseline_row(kind: str, model_name: str) -> tuple[str, str, dict, bool]:
    """(row label, name for `build`, overrides, checkpointing) of a baseline on `model_name`'s tower."""
    return f"{kind} ({model_name})", f"baseline:{kind}:{model_name}", {}, False


def build(model_name: str, frames: int, precision: str, device: str, overrides: dict, num_classes: int = 174):
    """An s4v model or a baseline (`baseline:<kind>:<s4v model>`), random weights."""
    import s4v

    dtype = "bf16" if precision == "bf16" else None
    if model_name.startswith("baseline:"):
        from s4v.bench.baselines import create_baseline

        _, kind, base = model_name.split(":")
        return create_baseline(kind, base, num_classes, frames, device=device, backbone_dtype=dtype)
    return s4v.create_model(model_name, num_classes, frames, device=device, backbone_dtype=dtype, **overrides)


def run_rows(models: list[str], frames: int, batch: int, precisions: list[str], device: str,
             baselines: bool, step: bool, variants: Optional[list[str]] = None, log=print,
             trace_peak: bool = False) -> list[Row]:
    from s4v.model.specs import get_spec

    rows: list[Row] = []
    for model_name in models:
        size = get_spec(model_name).backbone.image_size
        for precision in precisions:
            torch.manual_seed(0)
            video = torch.randn(batch, frames, 3, size, size, device=device)
            todo = [(f"{model_name} {lab}", model_name, ov, ck) for lab, ov, ck in s4v_variants()
                    if variants is None or lab in variants]
            if baselines:
                from s4v.bench.baselines import KINDS

                todo += [baseline_row(kind, model_name) for kind in KINDS]
            for label, name, overrides, ckpt in todo:
                try:
                    model = build(name, frames, precision, device, overrides)
                    if ckpt:
                        model.set_grad_checkpointing(True)
                    row = measure(model, video, precision, label, name, step=step or trace_peak,
                                  trace_peak=trace_peak)
                except torch.OutOfMemoryError:
                    row = Row(label, name, batch, frames, precision, note="OOM")
                except Exception as err:  # one failing row must not kill the others
                    row = Row(label, name, batch, frames, precision, note=f"error: {type(err).__name__}: {err}")
                rows.append(row)
                log(format_row(row, rows))
                if row.peak_op is not None:
                    from s4v.bench.op_peak import format_report

                    log("    " + format_report(row.peak_op).replace("\n", "\n    "))
                model = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


# -- output -----------------------------------------------------------------------------------------

HEADER = (f"{'row':<34} {'prec':>4} {'B':>3} {'train M':>8} {'weights':>8} {'grads':>7} {'optim':>7} "
          f"{'acts':>8} {'acts/clip':>9} {'ratio':>6} {'total':>8} {'cuda pk':>8} {'step s':>7}")


def _reference(row: Row, rows: list[Row]) -> Optional[Row]:
    base = row.model.split(":")[-1]
    for r in rows:
        if r.model == base and r.name.endswith(" default") and r.precision == row.precision and r.saved:
            return r
    return None


def format_row(row: Row, rows: list[Row]) -> str:
    if row.note and not row.saved:
        return f"{row.name:<34} {row.precision:>4} {row.batch:>3}   {row.note}"
    ref = _reference(row, rows)
    ratio = f"{row.saved / ref.saved:6.2f}" if ref else f"{'-':>6}"
    gb = lambda n: f"{n / 1e9:7.2f}G"  # noqa: E731
    peak = gb(row.cuda_peak) if row.cuda_peak else f"{'-':>8}"
    return (f"{row.name:<34} {row.precision:>4} {row.batch:>3} {row.trainable / 1e6:8.1f} {gb(row.weights)} "
            f"{row.grads / 1e9:6.2f}G {row.optim / 1e9:6.2f}G {gb(row.saved)} {row.saved_per_clip_mib:7.1f}Mi "
            f"{ratio} {gb(row.total)} {peak} {row.step_s:7.2f}")


def format_categories(rows: list[Row]) -> str:
    cats = [c for c in CATEGORIES if any(c in r.categories for r in rows)]
    lines = [f"{'row (MiB per clip)':<34} {'prec':>4} " + " ".join(f"{c[:9]:>9}" for c in cats)]
    for r in rows:
        if not r.saved:
            continue
        lines.append(f"{r.name:<34} {r.precision:>4} " + " ".join(
            f"{r.categories.get(c, 0) / r.batch / MiB:9.1f}" for c in cats))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="s4v bench memory", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="s4v_b16", help="comma list of s4v model names")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch", type=int, default=1, help="clips per step (CPU default 1; acts scale linearly)")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16 (autocast + bf16 backbone)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--variants", default=None, help="comma list of s4v row variants (default: all)")
    p.add_argument("--step", action="store_true", help="also time a full step (and the CUDA peak on a GPU)")
    p.add_argument("--trace-peak", action="store_true",
                   help="one more step per row: the operator call where it peaks and the calls with the largest "
                        "transient memory (on the CPU, from the live outputs of each call)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"device {a.device}; {a.frames} frames; batch {a.batch}; acts = bytes saved for backward")
    print(HEADER)
    rows = run_rows(a.models.split(","), a.frames, a.batch, a.precision.split(","), a.device,
                    not a.no_baselines, a.step or a.device == "cuda",
                    a.variants.split(",") if a.variants else None, trace_peak=a.trace_peak)
    print()
    print(format_categories(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
