"""Training building blocks that need no data: DeepSpeed config merging, LR schedule, checkpoint
bookkeeping, synchronised BatchNorm, recognition metrics."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from s4v.eval.metrics import accuracy_report, topk_accuracy
from s4v.train import checkpoint
from s4v.train.dist import free_port
from s4v.train.engine import build_ds_config, warmup_cosine

DS_ARGS = dict(micro_batch=4, grad_accum=2, world_size=3, grad_clip=1.0, lr=1e-3, betas=(0.9, 0.999),
               eps=1e-8, weight_decay=0.15, device_type="cpu")


def test_ds_config_filled_from_experiment():
    cfg = build_ds_config({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, **DS_ARGS)
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["optimizer"]["params"]["weight_decay"] == 0.15


@pytest.mark.parametrize("base,match", [
    ({"train_batch_size": 32}, "train_batch_size=32 but the experiment gives 24"),
    ({"optimizer": {"type": "Adam"}}, "belong in the experiment YAML"),
    ({"fp16": {"enabled": True}}, "fp16 training needs a GPU"),
])
def test_ds_config_conflicts_are_errors(base, match):
    with pytest.raises(ValueError, match=match):
        build_ds_config(base, **DS_ARGS)


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == 0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_global_progress_cosine_is_clip4clips_schedule():
    """CLIP4Clip's warmup_cosine(x): x / warmup below warmup, else 0.5 (1 + cos(pi x)), x = step / total."""
    f = warmup_cosine(total_steps=100, warmup_steps=10, global_progress=True)
    for step in (0, 5, 10, 11, 50, 99, 100):
        x = step / 100
        want = x / 0.1 if x < 0.1 else 0.5 * (1 + math.cos(math.pi * x))
        assert f(step) == pytest.approx(want, abs=1e-12), step


def _bertadam_reference(p0, grads, lr, betas, eps, wd):
    """The official update, written out per step: no bias correction, decay added to the update."""
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for g in grads:
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * (m / (v.sqrt() + eps) + wd * p)
    return p


def test_bertadam_matches_the_official_update_and_differs_from_adamw():
    from s4v.train.bertadam import BertAdam

    torch.manual_seed(0)
    p0 = torch.randn(7, 3, dtype=torch.float64)
    grads = [torch.randn(7, 3, dtype=torch.float64) for _ in range(5)]
    kw = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    finals = {}
    for name, cls in (("bert", BertAdam), ("adamw", torch.optim.AdamW)):
        p = torch.nn.Parameter(p0.clone())
        opt = cls([p], **kw)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        finals[name] = p.detach()
    want = _bertadam_reference(p0, grads, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"])
    assert torch.allclose(finals["bert"], want, atol=1e-14)
    assert (finals["bert"] - finals["adamw"]).abs().max() > 1e-3  # bias correction matters early on
    # a flattened parameter (as ZeRO hands it over) gets the same elementwise update
    flat = torch.nn.Parameter(p0.clone().view(-1))
    opt = BertAdam([flat], **kw)
    for g in grads:
        flat.grad = g.clone().view(-1)
        opt.step()
    assert torch.allclose(flat.detach().view(7, 3), want, atol=1e-14)


def test_bertadam_ds_config_has_no_optimizer_entry():
    cfg = build_ds_config({"zero_optimization": {"stage": 2}}, **{**DS_ARGS, "optimizer": "bertadam"})
    assert "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"] is True
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_ds_config({}, **{**DS_ARGS, "optimizer": "sgd"})


def test_latest_tag_ignores_incomplete(tmp_path):
    for step, complete in [(10, True), (20, True), (30, False)]:
        d = tmp_path / checkpoint.tag_for(step)
        d.mkdir()
        if complete:
            (d / checkpoint.COMPLETE).write_text("ok")
    (tmp_path / "latest").write_text(checkpoint.tag_for(30))  # crash after latest, before COMPLETE
    assert checkpoint.latest_tag(tmp_path) == checkpoint.tag_for(20)
    (tmp_path / "latest").write_text(checkpoint.tag_for(10))
    assert checkpoint.latest_tag(tmp_path) == checkpoint.tag_for(10)
    assert checkpoint.latest_tag(tmp_path / "nothing") is None


def test_topk_and_mean_class_accuracy():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 1, 1, 0])
    acc = topk_accuracy(scores, labels, (1, 2))
    assert acc[1] == pytest.approx(0.5) and acc[2] == pytest.approx(0.75)
    rep = accuracy_report(scores, labels, 3)
    assert rep["confusion"].tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    assert rep["mean_class_acc"] == pytest.approx(0.5)  # class 2 absent from labels: not averaged


def _sync_bn_worker(rank, world, port, x, grad_out, results):
    import torch.distributed as dist

    from s4v.model.layers import TokenBatchNorm
    from s4v.train.sync_bn import convert_sync_token_bn

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bn = convert_sync_token_bn(torch.nn.Sequential(TokenBatchNorm(6)))[0]
    bn.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    part = x.chunk(world)[rank].clone().requires_grad_(True)
    out = bn(part)
    (out * grad_out.chunk(world)[rank]).sum().backward()
    results[rank] = (out.detach(), part.grad, bn.weight.grad, bn.running_mean.clone(), bn.running_var.clone())
    dist.destroy_process_group()


def test_sync_batchnorm_equals_single_process_full_batch():
    from s4v.model.layers import TokenBatchNorm

    x = torch.randn(8, 5, 6) * 3 + 1
    grad_out = torch.randn(8, 5, 6)
    ref = TokenBatchNorm(6)
    ref.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    xr = x.clone().requires_grad_(True)
    out = ref(xr)
    (out * grad_out).sum().backward()
    results = mp.Manager().dict()
    mp.spawn(_sync_bn_worker, args=(2, free_port(), x, grad_out, results), nprocs=2)
    got_out = torch.cat([results[0][0], results[1][0]])
    got_grad = torch.cat([results[0][1], results[1][1]])
    assert torch.allclose(got_out, out.detach(), atol=1e-5)
    assert torch.allclose(got_grad, xr.grad, atol=1e-5)
    # weight grads are per-rank partial sums (DeepSpeed all-reduces them): their sum is the full grad
    assert torch.allclose(results[0][2] + results[1][2], ref.weight.grad, atol=1e-4)
    assert torch.allclose(results[0][3], ref.running_mean, atol=1e-6)
    assert torch.allclose(results[1][4], ref.running_var, atol=1e-5)


def _lineage_segment(run_dir, world: int, resume_from=None, keys=()):
    """One attempt of a run on `world` ranks: resume from `resume_from` (a checkpoint's (rank sizes,
    former-rank sizes)), rank r trains keys[r], then a checkpoint; returns what it records."""
    from s4v.train.lineage import SampleLineage

    ranks = [SampleLineage(run_dir, r) for r in range(world)]
    if resume_from is not None:
        for lineage in ranks:
            lineage.rewind(*resume_from)
    for lineage, key in zip(ranks, keys):
        lineage.write(0, 1, 0, {"key": [key]})
    saved = ([lineage.flush() for lineage in ranks], ranks[0].sizes_from_rank(world))
    for lineage in ranks:
        lineage.file.close()
    return saved


@pytest.mark.parametrize("worlds", [(2, 1, 2), (2, 1, 1), (3, 1, 2, 1)])
def test_lineage_keeps_rows_of_ranks_an_earlier_world_had(tmp_path, worlds):
    """2 -> 1 -> 2 (and 2 -> 1 -> 1): rank 1's rows from before the world shrank were emptied at the next
    resume, because a 1-rank checkpoint knew no size for rank1.jsonl."""
    from s4v.train.lineage import read_lineage

    saved, trained = None, []
    for i, world in enumerate(worlds):
        keys = [f"s{i}r{r}" for r in range(world)]
        saved = _lineage_segment(tmp_path, world, saved, keys)
        trained += keys
    _lineage_segment(tmp_path, 1, saved)  # one more resume, then nothing trained
    assert sorted(k for row in read_lineage(tmp_path) for k in row["keys"]) == sorted(trained)


def test_lineage_rows_written_after_the_checkpoint_are_dropped(tmp_path):
    from s4v.train.lineage import SampleLineage, read_lineage

    saved = _lineage_segment(tmp_path, 2, None, ["a", "b"])
    late = [SampleLineage(tmp_path, r) for r in range(3)]  # a 3-rank attempt that never checkpointed
    for lineage, key in zip(late, ["x", "y", "z"]):
        lineage.write(0, 2, 0, {"key": [key]})
        lineage.flush()
        lineage.file.close()
    _lineage_segment(tmp_path, 1, saved)
    assert sorted(k for row in read_lineage(tmp_path) for k in row["keys"]) == ["a", "b"]
