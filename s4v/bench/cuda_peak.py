"""What is live at the CUDA memory peak of a training step, read from the caching allocator's trace.

`torch.cuda.max_memory_allocated()` says how high a step went, not why. With the allocator's history
recorded (`torch.cuda.memory._record_memory_history`) during the step, `live_at_peak` replays the
trace (alloc +size, free_requested -size), finds the highest point and groups the blocks live there
by the code that allocated them (the innermost frame in s4v, open_clip, timm or torch.nn), so a
bench row can say e.g. "3.1 GB side_net.py:140 forward". Blocks allocated before recording started
(weights, optimizer state) are not in the trace; `base` is what was allocated then.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

OWN_CODE = ("/s4v/", "/open_clip/", "/timm/", "/torch/nn/")


def where(frames: Iterable[dict]) -> str:
    """The innermost frame of our model code (else the innermost frame) as `file.py:line name`."""
    frames = list(frames)
    chosen = next((f for f in frames if any(part in f.get("filename", "") for part in OWN_CODE)),
                  frames[0] if frames else None)
    if chosen is None:
        return "?"
    return f"{chosen['filename'].rsplit('/', 1)[-1]}:{chosen.get('line', 0)} {chosen.get('name', '')}"


def live_at_peak(trace: list[dict[str, Any]], top: int = 12) -> dict[str, Any]:
    """`trace`: one device's trace entries. Returns the peak growth in bytes (above what was live when
    the trace began), its position in the trace, and the largest groups of blocks live at that point."""
    current = peak = 0
    peak_at = -1
    sizes: dict[int, int] = {}
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            sizes[e["addr"]] = e["size"]
            current += e["size"]
            if current > peak:
                peak, peak_at = current, i
        elif e["action"] == "free_requested" and e["addr"] in sizes:
            current -= sizes.pop(e["addr"])
    live: dict[int, tuple[int, str]] = {}
    for e in trace[:peak_at + 1]:  # replay up to the peak, now keeping where each block came from
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], where(e.get("frames", [])))
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    groups: dict[str, list[int]] = {}
    for size, site in live.values():
        g = groups.setdefault(site, [0, 0])
        g[0] += size
        g[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"peak_growth": peak, "peak_index": peak_at, "events": len(trace),
            "groups": [{"site": site, "bytes": b, "blocks": n} for site, (b, n) in ranked]}


def start_recording(max_entries: int = 500_000) -> int:
    """Record the allocator's history from now on; returns the bytes allocated at this point."""
    import torch

    # Python frames only: they are all `where` reads, and symbolising C++ frames can make the snapshot
    # take minutes (backward's kernels are attributed by s4v.bench.op_peak instead).
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=max_entries)
    return torch.cuda.memory_allocated()


def stop_recording(device: Optional[int] = None, top: int = 12) -> dict[str, Any]:
    """Stop recording and read the peak of what was recorded (see `live_at_peak`)."""
    import torch

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    index = torch.cuda.current_device() if device is None else device
    traces = snapshot.get("device_traces", [])
    return live_at_peak(traces[index] if index < len(traces) else [], top)


def format_groups(report: dict[str, Any], base: int = 0) -> str:
    lines = [f"peak = {base / 1e9:.2f} GB before the step + {report['peak_growth'] / 1e9:.2f} GB allocated in it "
             f"(trace event {report['peak_index']} of {report['events']}); live at the peak, by allocating code:"]
    lines += [f"  {g['bytes'] / 1e9:7.3f} GB  {g['blocks']:6d} blocks  {g['site']}" for g in report["groups"]]
    return "\n".join(lines)
