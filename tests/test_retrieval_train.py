"""Retrieval training through the real `s4v train` entry on synthetic captioned videos, `s4v eval` of the
exported model, and the gradient of the global contrastive loss across two gloo ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    from data_prep.synthetic import generate

    root = tmp_path_factory.mktemp("pair4")
    generate(root, train=64, val=32, size=32, frames=8, codec="h264", task="pair4", seed=0, shard_size=32,
             workers=1, progress=False)
    return root


def _result(stdout: str) -> dict:
    line = [x for x in stdout.splitlines() if x.startswith("RESULT_JSON ")][-1]
    return json.loads(line[len("RESULT_JSON "):])


@pytest.mark.slow
def test_tiny_retrieval_learns_its_pairs_and_s4v_eval_reads_the_export(captioned, tmp_path):
    """64 pair4 clips with captions ("a red square moves left and a blue disc moves up"), 40 passes of 2
    steps: text-to-video R@1 on the trained pairs far above chance (1/64 = 1.6 %)."""
    args = {"task": "retrieval", "model.name": "s4v_retrieval_tiny", "model.num_frames": 4,
            "model.backbone_dtype": "fp32", "data.root": str(captioned), "data.loader": "pyav",
            "data.num_frames": 4, "data.sampling": "segment", "data.val_split": "train", "data.image_size": 32,
            "data.resize_short": 32, "data.crop_area": "[1.0,1.0]", "data.crop_ratio": "[1.0,1.0]",
            "data.flip": "false", "data.grayscale_prob": 0.0, "data.batch_size": 32, "data.num_workers": 0,
            "data.min_shards_per_reader": 0, "engine.ds_config": "ds_configs/zero2_fp32.json", "optim.lr": 1e-3,
            "optim.weight_decay": 0.0, "optim.warmup_epochs": 2, "retrieval.clip_lr": 1e-3, "train.epochs": 40,
            "train.output_dir": str(tmp_path), "train.run_name": "tiny", "train.keep_checkpoints": 1,
            "train.log_every_steps": 10, "eval.every_epochs": 20, "train.export": True, "train.seed": 0}
    proc = subprocess.run([sys.executable, "-m", "s4v.train", *[f"{k}={v}" for k, v in args.items()]], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = _result(proc.stdout)
    assert res["status"] == "finished" and res["step"] == 80
    assert res["val_t2v_r1"] >= 15.0 and res["val_v2t_r1"] >= 15.0, res  # chance: 1.6
    assert res["val_t2v_meanr"] < 10.0, res  # chance: 32.5
    run_dir = Path(res["run_dir"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_single/t2v_r1" in r for r in rows) and any("val/v2t_medr" in r for r in rows)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # `s4v eval` of the run: the same numbers as the end of training; then the held-out split.
    out = subprocess.run([sys.executable, "-m", "s4v.cli.main", "eval", str(run_dir)], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["t2v_r1"] == pytest.approx(res["val_t2v_r1"], abs=1e-6)
    assert report["num_videos"] == 64 and report["num_texts"] == 64
    held = subprocess.run([sys.executable, "-m", "s4v.cli.main", "eval", str(run_dir), "data.val_split=val"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert held.returncode == 0, held.stderr[-3000:]
    val = _result(held.stdout)
    assert val["num_videos"] == 32 and 0.0 <= val["t2v_r1"] <= 100.0


def _two_rank_worker(rank, world, port, out):
    import torch.distributed as dist

    from s4v.train.tasks import contrastive_loss, gather_with_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    x = torch.randn(8, 6)
    valid = torch.tensor([True, True, False, True, True, True, True, False])
    local = slice(rank * 4, rank * 4 + 4)
    f = torch.nn.functional.normalize(lin(x[local]), dim=-1)
    g = gather_with_grad(f)
    loss = contrastive_loss(10 * g @ g.T.flip(0), valid)  # text i <-> video i, a non-symmetric matrix
    loss.backward()
    grad = lin.weight.grad.clone()
    dist.all_reduce(grad)
    grad /= world  # DeepSpeed / DDP average the ranks' gradients
    if rank == 0:
        torch.save({"loss": loss.detach(), "grad": grad}, out)
    dist.destroy_process_group()


def test_gathered_loss_gradient_equals_the_single_process_gradient(tmp_path):
    import torch.multiprocessing as mp

    from s4v.train.dist import free_port
    from s4v.train.tasks import contrastive_loss

    out = tmp_path / "two.pt"
    mp.spawn(_two_rank_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    two = torch.load(out)
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    x = torch.randn(8, 6)
    valid = torch.tensor([True, True, False, True, True, True, True, False])
    f = torch.nn.functional.normalize(lin(x), dim=-1)
    loss = contrastive_loss(10 * f @ f.T.flip(0), valid)
    loss.backward()
    assert two["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(two["grad"], lin.weight.grad, atol=1e-6)
