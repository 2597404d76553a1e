"""Elastic resume, the state part: a checkpoint written by N ranks loads on M ranks (1 -> 2 and 2 -> 1,
ZeRO-2 and ZeRO-3). After loading, the fp32 master weights, Adam moments and step count, the learning
rate and DeepSpeed's step count equal those saved, and one more optimizer step on the same global batch
gives the same weights as the writer's own next step. Also: the export holds the fp32 master weights
of a bf16 engine. Real DeepSpeed on the CPU (gloo) through `tests/_elastic_worker.py`."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from tests._train_fixtures import python_cmd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def worker(nproc: int, out, *args: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(python_cmd(nproc, "-m", "tests._elastic_worker", "--out", str(out), *args),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def worst(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].numel())


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def elastic(request, tmp_path_factory):
    """Per ZeRO stage: 1 rank and 2 ranks each train 2 steps and checkpoint; then 2 ranks load the
    1-rank checkpoint and 1 rank loads the 2-rank one, each taking one more step."""
    root = tmp_path_factory.mktemp(f"elastic_zero{request.param}")
    stage = ("--stage", str(request.param))
    for n in (1, 2):
        worker(n, root / f"write{n}", *stage, "--save", str(root / f"ckpt{n}"))
    for n, m in ((1, 2), (2, 1)):
        worker(m, root / f"load{n}to{m}", *stage, "--load", str(root / f"ckpt{n}"))
    return root


@pytest.mark.parametrize("n,m", [(1, 2), (2, 1)], ids=["1to2", "2to1"])
def test_state_loaded_on_another_world_size_equals_the_saved_one(elastic, n, m):
    saved = torch.load(elastic / f"write{n}" / "saved.pt")
    loaded = torch.load(elastic / f"load{n}to{m}" / "loaded.pt")
    assert loaded["rank_states"] == n and loaded["client_step"] == 2
    assert all(v.dtype == torch.float32 for v in loaded["params"].values())
    assert worst(saved["params"], loaded["params"]) == 0.0
    assert worst(saved["moments"], loaded["moments"]) == 0.0
    assert loaded["adam_steps"] == saved["adam_steps"] == [2.0]
    assert loaded["lr"] == saved["lr"] and loaded["global_steps"] == saved["global_steps"] == 2


@pytest.mark.parametrize("n,m", [(1, 2), (2, 1)], ids=["1to2", "2to1"])
def test_next_step_after_elastic_load_matches_the_writer(elastic, n, m):
    ref = torch.load(elastic / f"write{n}" / "next.pt")
    got = torch.load(elastic / f"load{n}to{m}" / "next.pt")
    before = torch.load(elastic / f"write{n}" / "saved.pt")
    assert worst(before["params"], ref["params"]) > 1e-4  # the step really moves the weights
    assert worst(ref["params"], got["params"]) <= 1e-6
    assert got["adam_steps"] == [3.0] and got["global_steps"] == 3 and got["lr"] == ref["lr"]


@pytest.mark.parametrize("stage", [2, 3])
def test_export_holds_fp32_master_weights(tmp_path, stage):
    """bf16 engine on 2 ranks: DeepSpeed casts the module to bf16 in place; the export must hold the
    fp32 masters (dtype and values), ZeRO-2 and ZeRO-3 (partitioned masters)."""
    worker(2, tmp_path, "--stage", str(stage), "--dtype", "bf16", "--export", "--save", str(tmp_path / "ckpt"))
    masters = torch.load(tmp_path / "masters.pt")
    sd = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    exported = {k: v for k, v in sd.items() if k in masters}
    assert sorted(exported) == sorted(masters)
    assert {v.dtype for v in exported.values()} == {torch.float32}
    assert worst(masters, exported) == 0.0
    rounded = {k: v.bfloat16().float() for k, v in masters.items()}
    assert worst(masters, rounded) > 0  # the masters are not bf16 values: the check can fail
