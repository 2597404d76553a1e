"""Benchmarks: baselines in the same harness, `s4v bench memory|throughput`, the GPU script (dry run on CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from s4v.bench.baselines import create_baseline
from s4v.bench.memory import main as memory_main
from s4v.bench.throughput import main as throughput_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["full-finetune", "st-adapter", "linear-probe"])
def test_baselines_train_what_they_should(kind):
    torch.manual_seed(0)
    model = create_baseline(kind, "s4v_tiny", 5, 4).train()
    x = torch.randn(2, 4, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 5)
    out.square().sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tower = {n for n in trainable if n.startswith("tower.") and ".adapter." not in n}
    adapters = {n for n in trainable if ".adapter." in n}
    assert ("head.weight" in trainable) and all(model.get_parameter(n).grad is not None for n in trainable)
    if kind == "full-finetune":
        assert tower and not adapters
    elif kind == "st-adapter":
        assert not tower and len(adapters) == 6 * 2  # down, conv, up (weight + bias) in each of 2 blocks
        assert model.get_parameter("tower.transformer.resblocks.0.adapter.up.weight").grad.abs().sum() > 0
    else:
        assert trainable == {"head.weight", "head.bias"}


def test_st_adapter_is_the_frozen_tower_at_init():
    """Zero-initialised up-projections: at init the adapted tower computes the plain tower's features."""
    torch.manual_seed(0)
    probe = create_baseline("linear-probe", "s4v_tiny", 5, 4).eval()
    torch.manual_seed(0)
    adapter = create_baseline("st-adapter", "s4v_tiny", 5, 4).eval()
    sd = {k.replace(".block.", "."): v for k, v in adapter.state_dict().items() if ".adapter." not in k}
    probe.load_state_dict(sd)
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(probe(x), adapter(x), atol=1e-6)


def test_memory_bench_table(capsys, tmp_path):
    out = tmp_path / "rows.json"
    assert memory_main(["--models", "s4v_tiny", "--frames", "4", "--batch", "2", "--precision", "fp32",
                        "--variants", "official-like,default,default+ckpt", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "s4v_tiny default" in text and "st-adapter (s4v_tiny)" in text and "linear-probe" in text
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    default, ckpt = rows["s4v_tiny default"], rows["s4v_tiny default+ckpt"]
    assert ckpt["saved"] < default["saved"] < rows["s4v_tiny official-like"]["saved"]
    assert rows["linear-probe (s4v_tiny)"]["saved"] < default["saved"]
    assert rows["full-finetune (s4v_tiny)"]["trainable"] > rows["st-adapter (s4v_tiny)"]["trainable"]


def test_throughput_bench(capsys):
    assert throughput_main(["--models", "s4v_tiny", "--frames", "4", "--batch", "2", "--steps", "1",
                            "--variants", "default", "--baselines", "linear-probe", "--precision", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "s4v_tiny default" in text and "linear-probe (s4v_tiny)" in text


def test_cli_lists_the_benches():
    out = subprocess.run([sys.executable, "-m", "s4v.cli.main", "bench", "memory", "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "s4v bench memory" in out.stdout, out.stderr


def test_gpu_script_dry_run_on_cpu(tmp_path):
    """bench/gpu.sh's driver on the CPU with the tiny model: every row ends ok or recorded, table written."""
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")]).returncode == 0
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--device", "cpu", "--models",
                          "s4v_tiny", "--batch", "2", "--frames", "4", "--out", str(tmp_path), "--trace-peak"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert [r["status"] for r in data["rows"]] == ["ok"] * 4
    # --trace-peak: each row says in which call its step peaks (on the CPU from the live outputs)
    for r in data["rows"]:
        assert r["peak_op"]["calls"] > 50 and r["peak_op"]["peak"]["high"] > 0, r
    assert res.stdout.count("step peak ") == 4 and "(backward in " in res.stdout, res.stdout[-3000:]
    assert "| s4v_tiny default |" in (tmp_path / "gpu_bench.md").read_text()


def test_live_at_peak_replays_the_allocator_trace():
    """A hand-made allocator trace: the peak is where the most bytes are allocated at once, and the blocks
    live there are grouped by the innermost frame of model code that allocated them."""
    from s4v.bench.cuda_peak import format_groups, live_at_peak, where

    side = [{"filename": "/x/torch/autograd/graph.py", "line": 1, "name": "run"},
            {"filename": "/repo/s4v/model/side_net.py", "line": 140, "name": "forward"}]
    tower = [{"filename": "/site/open_clip/transformer.py", "line": 77, "name": "attention"}]
    other = [{"filename": "/x/elsewhere.py", "line": 5, "name": "f"}]
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": tower},
        {"action": "alloc", "addr": 2, "size": 50, "frames": side},
        {"action": "free_requested", "addr": 1, "size": 100, "frames": []},
        {"action": "free_completed", "addr": 1, "size": 100, "frames": []},
        {"action": "alloc", "addr": 3, "size": 70, "frames": side},
        {"action": "alloc", "addr": 4, "size": 40, "frames": other},  # peak: 50 + 70 + 40 = 160
        {"action": "free_requested", "addr": 3, "size": 70, "frames": []},
        {"action": "alloc", "addr": 5, "size": 60, "frames": tower},  # 150, below the peak
        {"action": "free_requested", "addr": 99, "size": 10, "frames": []},  # allocated before the trace
    ]
    r = live_at_peak(trace)
    assert r["peak_growth"] == 160 and r["peak_index"] == 5 and r["events"] == 9
    assert [(g["site"], g["bytes"], g["blocks"]) for g in r["groups"]] == [
        ("side_net.py:140 forward", 120, 2), ("elsewhere.py:5 f", 40, 1)]
    assert where(tower) == "transformer.py:77 attention" and where([]) == "?"
    text = format_groups(r, base=2 * 10 ** 9)
    assert "2.00 GB before the step" in text and "side_net.py:140 forward" in text


class _ScriptedAllocator:
    """Counters that only the test's custom ops move: `keep` allocates for good, `workspace` allocates
    and frees inside one call."""

    def __init__(self):
        self.current = self.high = 0

    def allocated(self):
        return self.current

    def peak(self):
        return self.high

    def reset_peak(self):
        self.high = self.current

    def alloc(self, n):
        self.current += n
        self.high = max(self.high, self.current)


_ALLOC = _ScriptedAllocator()


@torch.library.custom_op("s4v_test::keep", mutates_args=())
def _keep(x: torch.Tensor, nbytes: int) -> torch.Tensor:
    _ALLOC.alloc(nbytes)
    return x.clone()


@torch.library.custom_op("s4v_test::workspace", mutates_args=())
def _workspace(x: torch.Tensor, nbytes: int, backward_nbytes: int) -> torch.Tensor:
    _ALLOC.alloc(nbytes)
    _ALLOC.alloc(-nbytes)
    return x * 2


def _workspace_backward(ctx, grad):
    return torch.ops.s4v_test.workspace(grad, ctx.backward_nbytes, 0), None, None


def _workspace_setup(ctx, inputs, output):
    ctx.backward_nbytes = inputs[2]


torch.library.register_autograd("s4v_test::workspace", _workspace_backward, setup_context=_workspace_setup)
torch.library.register_autograd("s4v_test::keep", lambda ctx, g: (g, None))


def test_op_peak_recorder_names_the_call_and_module_where_a_step_peaks():
    """The step's peak is inside the backward of `second`'s op (100 kept + 300 of workspace); the
    transients are ranked with their phase and module; a call without allocations is not listed."""
    from s4v.bench.op_peak import OpPeakRecorder, format_report

    class First(nn.Module):
        def forward(self, x):
            return torch.ops.s4v_test.workspace(torch.ops.s4v_test.keep(x, 100), 10, 0)

    class Second(nn.Module):
        def forward(self, x):
            return torch.ops.s4v_test.workspace(x, 50, 300)

    model = nn.Sequential()
    model.add_module("first", First())
    model.add_module("second", Second())
    x = torch.randn(3, 4, requires_grad=True)
    with OpPeakRecorder(_ALLOC) as rec:
        model(x).sum().backward()
    r = rec.report()
    assert r["peak"]["op"] == "s4v_test.workspace.default"
    assert (r["peak"]["phase"], r["peak"]["module"], r["peak"]["high"], r["peak"]["transient"]) == \
        ("backward", "second", 400, 300)
    assert r["peak"]["args"] == "[3, 4] float32"
    got = [(t["transient"], t["phase"], t["module"]) for t in r["largest_transients"]]
    assert got == [(300, "backward", "second"), (50, "forward", "second"), (10, "forward", "first")]
    text = format_report(r)
    assert text.startswith("step peak 400 B, reached in s4v_test.workspace.default (backward in second) [3, 4] "
                           "float32: 100 B allocated before the call, 300 B transient"), text


def test_memory_bench_trace_peak_agrees_with_the_saved_tensor_count(capsys, tmp_path):
    """`--trace-peak` on the CPU: the step peaks in backward, and at that point at least everything saved
    for backward (less the input video, which existed before the step) is live, two independent counts."""
    out = tmp_path / "rows.json"
    assert memory_main(["--models", "s4v_tiny", "--frames", "4", "--batch", "2", "--precision", "fp32",
                        "--variants", "default", "--no-baselines", "--trace-peak", "--json", str(out)]) == 0
    assert "step peak " in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    peak = row["peak_op"]["peak"]
    video_bytes = 2 * 4 * 3 * 32 * 32 * 4
    assert peak["phase"] == "backward" and peak["module"].startswith("side."), peak
    assert peak["high"] >= row["saved"] - video_bytes, (peak["high"], row["saved"])


def test_op_peak_recorder_lists_an_op_of_repeated_blocks_once():
    """The same call in blocks.0 and blocks.1 is one entry of the transient list, the larger one."""
    from s4v.bench.op_peak import OpPeakRecorder

    class Block(nn.Module):
        def __init__(self, nbytes):
            super().__init__()
            self.nbytes = nbytes

        def forward(self, x):
            return torch.ops.s4v_test.workspace(x, self.nbytes, 0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(20), Block(70))

        def forward(self, x):
            return self.blocks(x)

    with OpPeakRecorder(_ALLOC) as rec:
        Net()(torch.randn(2, 2))
    (entry,) = rec.report()["largest_transients"]
    assert (entry["transient"], entry["module"]) == (70, "blocks.1")
