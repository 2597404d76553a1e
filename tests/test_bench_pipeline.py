"""`s4v bench loader --baseline` (old vs pipelined DALI settings in one run) and `s4v bench throughput`'s
per-phase shares (data wait, frozen forward, side forward, side backward, optimizer) and compiled rows."""
import re

import pytest

import _video_fixtures as vf
from s4v.bench.loader import main as loader_main
from s4v.bench.throughput import PHASES
from s4v.bench.throughput import main as throughput_main


@pytest.fixture(scope="module")
def vp9(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_vp9")
    vf.simple_split(root, "train", 2, 6, codec="vp9")
    return root


def _rows(text: str, prefix: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.startswith(prefix)]


@pytest.mark.timeout(120)
def test_loader_bench_baseline_row_and_speedup(vp9, capsys):
    assert loader_main(["--shards", str(vp9), "--batches", "2", "--batch-size", "2", "--num-frames", "4",
                        "--workers", "1", "--image-size", "32", "--engines", "dali-cpu", "--baseline",
                        "--pipelines", "2", "--repeat", "2", "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    old, new = _rows(out, "dali-cpu-old"), [r for r in _rows(out, "dali-cpu ") if r[1] != "speed-up"]
    assert len(old) == 1 and len(new) == 1 and float(old[0][1]) > 0 and float(new[0][1]) > 0
    assert float(old[0][2]) == 1.0  # ratios relative to the first row: the old settings
    m = re.search(r"dali-cpu speed-up over the old settings: ([0-9.]+)x \(runs: ([0-9., ]+)\)", out)
    assert m and len(m.group(2).split(",")) == 2


def _shares(row: list[str]) -> list[float]:
    return [float(x.rstrip("%")) for x in row if x.endswith("%")]


@pytest.mark.timeout(120)
def test_throughput_rows_split_the_step_into_phases(vp9, capsys):
    assert throughput_main(["--models", "s4v_tiny", "--frames", "4", "--batch", "2", "--steps", "2",
                            "--variants", "default", "--precision", "fp32", "--shards", str(vp9),
                            "--loader", "dali-cpu", "--workers", "1", "--loader-batches", "2"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("model"))
    assert [h.rstrip("%") for h in header.split()[-len(PHASES):]] == list(PHASES)
    (row,) = _rows(out, "s4v_tiny default")
    shares = _shares(row)
    assert len(shares) == len(PHASES) and abs(sum(shares) - 100) < 0.5
    assert all(s > 0 for s in shares[1:])  # frozen forward, side forward and backward, optimizer all take time
    assert _rows(out, "loader dali-cpu alone")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_throughput_compiled_row_has_a_ratio_to_eager(capsys):
    assert throughput_main(["--models", "s4v_tiny", "--frames", "4", "--batch", "2", "--steps", "1",
                            "--variants", "default", "--precision", "fp32", "--compile", "none,side"]) == 0
    out = capsys.readouterr().out
    (row,) = _rows(out, "s4v_tiny default compile=side")
    assert row[-1] == "eager" and row[-2].endswith("x") and float(row[-2][:-1]) > 0
    assert abs(sum(_shares(row)) - 100) < 0.5 and _shares(row)[0] == 0.0  # random batches: no data wait
