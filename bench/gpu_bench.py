"""GPU memory and speed of s4v models and baselines (run by bench/gpu.sh; see docs/performance.md).

Per row: CUDA peak memory (max allocated and reserved) of a training step (forward + backward + AdamW,
bf16 autocast, frozen tower in bf16, random weights), step time, clips/s, model FLOPs utilisation, and
the bytes saved for backward per clip (same tracker as on CPU). Batch 32 first; on OOM the batch is
halved until it fits. One failing row does not stop the others. Results are rewritten after every row
(markdown + JSON) into --out, so a run cut short still leaves a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from s4v.bench.memory import MiB, PAPER_GB, baseline_row, build, measure  # noqa: E402
from s4v.bench.throughput import VARIANTS, train_flops_per_clip  # noqa: E402

# Rows in order of priority: a run cut short by its time budget still has the figures that matter most
# (the memory-saving mode against the paper's B/16 figure, then every model's s4v rows, then the
# comparisons). (model, variant) or (model, "baseline:<kind>").
PLAN = [
    ("s4v_b16", "default+ckpt"), ("s4v_b16", "default"),
    ("s4v_l14", "default+ckpt"), ("s4v_e14", "default+ckpt"), ("s4v_l14", "default"), ("s4v_e14", "default"),
    ("s4v_b16", "official-like"), ("s4v_b16", "baseline:st-adapter"), ("s4v_b16", "baseline:full-finetune"),
    ("s4v_b16", "mlp_recompute=fc1"), ("s4v_b16", "baseline:linear-probe"),
    ("s4v_l14", "official-like"), ("s4v_l14", "baseline:st-adapter"), ("s4v_l14", "baseline:full-finetune"),
    ("s4v_l14", "baseline:linear-probe"),
]
# Other model names (e.g. s4v_tiny for a CPU dry run) get these rows.
SHORT_PLAN = ["default", "default+ckpt", "baseline:st-adapter", "baseline:linear-probe"]
PAPER_KEY = {"s4v_b16": "B/16", "s4v_l14": "L/14"}


def run_row(label, name, overrides, ckpt, batch, frames, device, size, flops, peak_tflops, trace_peak=False):
    while batch >= 1:
        try:
            model = build(name, frames, "bf16", device, overrides)
            if ckpt:
                model.set_grad_checkpointing(True)
            video = torch.randn(batch, frames, 3, size, size, device=device)
            r = measure(model, video, "bf16", label, name, step=True, trace_peak=trace_peak)
            out = dict(row=label, model=name, batch=batch, status="ok", trainable_M=r.trainable / 1e6,
                       saved_per_clip_MiB=r.saved / batch / MiB, step_s=r.step_s, clips_s=batch / r.step_s,
                       cuda_peak_GB=(r.cuda_peak or 0) / 1e9,
                       cuda_reserved_GB=(r.cuda_reserved or 0) / 1e9,
                       weights_GB=r.weights / 1e9, grads_GB=r.grads / 1e9, optim_GB=r.optim / 1e9)
            if flops and device == "cuda":
                out["mfu"] = flops * batch / r.step_s / (peak_tflops * 1e12)
            if r.peak_sites is not None:
                out["peak_sites"], out["peak_base"] = r.peak_sites, r.peak_base
            if r.peak_op is not None:
                out["peak_op"] = r.peak_op
            return out
        except torch.OutOfMemoryError:
            print(f"  {label}: OOM at batch {batch}", flush=True)
            batch //= 2
        except Exception as err:  # noqa: BLE001 - a row's failure is recorded, the run goes on
            traceback.print_exc()
            return dict(row=label, model=name, batch=batch, status=f"error: {type(err).__name__}: {err}"[:200])
        finally:
            model = video = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    return dict(row=label, model=name, batch=0, status="OOM")


def run_row_in_subprocess(a, label, name, overrides, ckpt, size, flops) -> dict:
    """Each row in a fresh process, so that nothing a row allocated (or its allocator's cache, or a
    tracker's references) can raise the next row's peak; the first GPU run without this saw peaks
    grow row after row."""
    job = json.dumps(dict(label=label, name=name, overrides=overrides, ckpt=ckpt, batch=a.batch, frames=a.frames,
                          device=a.device, size=size, flops=flops, peak_tflops=a.peak_tflops,
                          trace_peak=a.trace_peak))
    import subprocess

    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--row", job], capture_output=True,
                              text=True, timeout=max(30.0, a.budget_s))
    except subprocess.TimeoutExpired:
        return dict(row=label, model=name, status="error: row timed out")
    lines = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
    if not lines:
        return dict(row=label, model=name, status=f"error: exit {proc.returncode}: {proc.stderr[-300:]}")
    for x in proc.stdout.splitlines():
        if "OOM at batch" in x:
            print(x, flush=True)
    row = json.loads(lines[-1][4:])
    if "peak_op" in row:  # --trace-peak: where the row's step peaks, and what is live there
        from s4v.bench.cuda_peak import format_groups
        from s4v.bench.op_peak import format_report

        report = [format_report(row["peak_op"])]
        if "peak_sites" in row:
            report.append(format_groups(row["peak_sites"], row["peak_base"]))
        print(f"{label} batch {row['batch']}:\n" + "\n".join(report), flush=True)
    return row


def to_markdown(rows, info):
    lines = [f"GPU: {info['gpu']}; torch {info['torch']}; {info['frames']} frames, bf16 autocast, frozen tower "
             "in bf16, random weights; AdamW.", "",
             "| row | batch | trainable (M) | CUDA peak alloc (GB) | reserved (GB) | paper (GB) | saved/clip (MiB) "
             "| step (s) | clips/s | MFU | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['row']} | {r.get('batch', '-')} | | | | | | | | | {r['status']} |")
            continue
        paper = ""
        key = PAPER_KEY.get(r["model"].split(":")[-1])
        kind = {"default": "Side4Video", "official-like": "Side4Video", "st-adapter": "ST-Adapter"}.get(
            r["row"].split(" ")[-1] if "(" not in r["row"] else r["row"].split(" ")[0])
        if key and kind and (key, kind) in PAPER_GB:
            paper = f"{PAPER_GB[(key, kind)]}"
        lines.append(f"| {r['row']} | {r['batch']} | {r['trainable_M']:.1f} | {r['cuda_peak_GB']:.2f} | "
                     f"{r['cuda_reserved_GB']:.2f} | {paper} | {r['saved_per_clip_MiB']:.1f} | {r['step_s']:.3f} | "
                     f"{r['clips_s']:.1f} | {r.get('mfu', float('nan')):.1%} | ok |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--row"]:  # child process: one row, printed as `ROW {json}`
        job = json.loads(argv[1])
        if job["device"] == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        r = run_row(job["label"], job["name"], job["overrides"], job["ckpt"], job["batch"], job["frames"],
                    job["device"], job["size"], job["flops"], job["peak_tflops"], job.get("trace_peak", False))
        print("ROW " + json.dumps(r), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default=None, help="comma list to restrict the plan (e.g. s4v_b16)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=230.0, help="start no new row after this many seconds")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--trace-peak", action="store_true",
                   help="one more step per row: the operator call where it peaks, the calls with the largest "
                        "transient memory, and what is live at the peak (the allocator's trace)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t_start = time.time()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    info = dict(gpu=torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, frames=a.frames, python=platform.python_version())
    from s4v.model.specs import get_spec

    plan = PLAN
    if a.models:  # a subset of the plan, in its order
        chosen = a.models.split(",")
        plan = [(m, r) for m in chosen for r in ([r for pm, r in PLAN if pm == m] or SHORT_PLAN)]
        plan.sort(key=lambda mr: PLAN.index(mr) if mr in PLAN else len(PLAN) + chosen.index(mr[0]))
    if a.no_baselines:
        plan = [(m, r) for m, r in plan if not r.startswith("baseline:")]
    rows = []
    for model_name, kind in plan:
        size = get_spec(model_name).backbone.image_size
        if kind.startswith("baseline:"):
            label, name, overrides, ckpt = baseline_row(kind.split(":", 1)[1], model_name)
        else:
            label, name, (overrides, ckpt) = f"{model_name} {kind}", model_name, VARIANTS[kind]
        if time.time() - t_start > a.budget_s:
            rows.append(dict(row=label, model=name, status="skipped: time budget"))
            continue
        t0 = time.time()
        try:
            flops = train_flops_per_clip(name, a.frames)  # None for the baselines
        except Exception:  # noqa: BLE001
            flops = None
        r = run_row_in_subprocess(a, label, name, overrides, ckpt, size, flops)
        r["row_s"] = time.time() - t0
        rows.append(r)
        print(json.dumps(r), flush=True)
        with open(os.path.join(a.out, "gpu_bench.json"), "w") as f:
            json.dump(dict(info=info, rows=rows), f, indent=1)
        with open(os.path.join(a.out, "gpu_bench.md"), "w") as f:
            f.write(to_markdown(rows, info))
    print(to_markdown(rows, info))
    print(f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
