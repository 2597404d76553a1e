"""Which operator a training step's memory peak happens in, and which operators need the most memory
for themselves while they run.

The allocator trace (`s4v.bench.cuda_peak`) names the Python line that allocated each block, but
backward kernels run in autograd's worker thread, where there is no Python frame, and a kernel's
workspace (cuDNN, cuBLAS, attention) is allocated and freed inside one call. This recorder is a
`TorchDispatchMode` that brackets every ATen call, forward and backward, with the allocator's
counters:

    before = allocated(); reset_peak(); op(); high = peak(); after = allocated()

`high` is the highest the step went during that call. The call where it is highest is where the step
peaks; `high - max(before, after)` is memory the call needed only while it ran (its transient:
workspaces and temporaries). Each call is attributed to the innermost module running (forward) or
being differentiated (backward), via torch's `ModTracker`.

The counters are the CUDA caching allocator's (`torch.cuda.memory_allocated` and friends), which are
host-side and exact at each call boundary without a synchronisation. On the CPU, which has no such
counters, `LiveTensorCounters` counts the storages of the calls' outputs while they live: it finds
where the step peaks but cannot see inside a call (every transient is 0).
"""
from __future__ import annotations

import dataclasses
import re
import weakref
from typing import Any, Iterable, Optional, Protocol

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocatorCounters(Protocol):
    def allocated(self) -> int: ...

    def peak(self) -> int: ...

    def reset_peak(self) -> None: ...


class CudaCounters:
    """The CUDA caching allocator's counters for one device."""

    def __init__(self, device: Optional[int] = None):
        self.device = torch.cuda.current_device() if device is None else device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


class LiveTensorCounters:
    """Bytes of the storages that recorded calls returned and that are still alive (each storage once;
    storages that existed before, e.g. `exclude`d parameters, are never counted)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {t.untyped_storage()._cdata for t in exclude}
        self._live: dict[int, int] = {}
        self._current = self._high = 0

    def observe(self, out: Any) -> None:
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live or key in self._excluded:
                continue
            self._live[key] = storage.nbytes()
            self._current += storage.nbytes()
            self._high = max(self._high, self._current)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self._current -= self._live.pop(key, 0)

    def allocated(self) -> int:
        return self._current

    def peak(self) -> int:
        return self._high

    def reset_peak(self) -> None:
        self._high = self._current


@dataclasses.dataclass
class OpCall:
    op: str  # e.g. "aten.convolution_backward.default"
    phase: str  # "forward" or "backward"
    module: str  # innermost module (fqn without the root class), "" when none
    args: str  # shapes and dtypes of the tensor arguments
    before: int  # bytes allocated when the call began
    high: int  # the highest the allocator went during the call
    transient: int  # high - max(before, after): memory the call needed only while it ran

    def describe(self) -> str:
        where = f" in {self.module}" if self.module else ""
        return f"{self.op} ({self.phase}{where}) {self.args}"


def _tensor_args(args, kwargs, limit: int = 4) -> str:
    shown = []
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor):
            shown.append(f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}")
            if len(shown) == limit:
                shown.append("...")
                break
    return ", ".join(shown)


def _innermost(parents: set[str]) -> str:
    names = [p for p in parents if p != "Global"]
    if not names:
        return ""
    deepest = max(names, key=lambda p: p.count("."))
    return deepest.split(".", 1)[1] if "." in deepest else ""


class OpPeakRecorder(TorchDispatchMode):
    """Use as a context manager around one training step (forward, backward and optimizer step);
    `report()` then says where the step peaked and which calls needed the most transient memory."""

    def __init__(self, counters: Optional[AllocatorCounters] = None, top: int = 8):
        super().__init__()
        self.counters = counters if counters is not None else CudaCounters()
        self._observe = getattr(self.counters, "observe", None)  # counters that watch outputs (CPU)
        self.top = top
        self.peak_call: Optional[OpCall] = None
        self.largest: dict[tuple[str, str, str], OpCall] = {}  # (op, phase, module pattern) -> largest
        self.calls = 0
        self._modules = self._mod_tracker()

    @staticmethod
    def _mod_tracker():
        try:
            from torch.distributed._tools.mod_tracker import ModTracker
        except ImportError:  # a torch without distributed: no module names
            return None
        return ModTracker()

    def __enter__(self):
        if self._modules is not None:
            self._modules.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if self._modules is not None:
            self._modules.__exit__(*exc)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counters
        before = c.allocated()
        c.reset_peak()
        out = func(*args, **kwargs)
        if self._observe is not None:
            self._observe(out)
        high, after = max(c.peak(), before), c.allocated()
        self.calls += 1
        transient = high - max(before, after)
        is_peak = self.peak_call is None or high > self.peak_call.high
        if is_peak or transient > 0:
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            module = _innermost(getattr(self._modules, "parents", set()))
            call = OpCall(str(func), phase, module, _tensor_args(args, kwargs), before, high, transient)
            if is_peak:
                self.peak_call = call
            # one entry per op and module pattern: blocks.3.mlp and blocks.7.mlp are blocks.*.mlp
            key = (call.op, phase, re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", module))
            if transient > 0 and (key not in self.largest or transient > self.largest[key].transient):
                self.largest[key] = call
        return out

    def report(self) -> dict[str, Any]:
        ranked = sorted(self.largest.values(), key=lambda r: -r.transient)[:self.top]
        return {"calls": self.calls,
                "peak": dataclasses.asdict(self.peak_call) if self.peak_call else None,
                "largest_transients": [dataclasses.asdict(r) for r in ranked]}


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_report(report: dict[str, Any]) -> str:
    peak = report.get("peak")
    if not peak:
        return "no operator calls recorded"
    call = OpCall(**peak)
    lines = [f"step peak {_size(call.high)}, reached in {call.describe()}: "
             f"{_size(call.before)} allocated before the call, {_size(call.transient)} transient",
             f"largest transients among {report['calls']} calls (memory a call needs only while it runs):"]
    if not report["largest_transients"]:
        lines[-1] = (f"no transients among {report['calls']} calls "
                     "(counters that see only outputs, such as the CPU's, show none)")
    for r in report["largest_transients"]:
        r = OpCall(**r)
        lines.append(f"  {_size(r.transient):>10} on top of {_size(r.before):>10}  {r.describe()}")
    return "\n".join(lines)

