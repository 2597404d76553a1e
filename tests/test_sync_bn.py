"""Synchronised BatchNorm through the whole side network, on two gloo ranks: with the memory-saving fused
norm paths (the defaults), with activation checkpointing and with them off, two ranks holding half a batch
each give the logits, gradients and running statistics of one process holding the whole batch."""
import os

import pytest
import torch
import torch.multiprocessing as mp

import s4v
from s4v.bench.memory import OFFICIAL_LIKE
from s4v.train.dist import free_port

SETTINGS = {"defaults": ({}, False), "checkpointing": ({}, True),
            "no_fusion": ({k: v for k, v in OFFICIAL_LIKE.items() if k != "side.attention"}, False)}


def _inputs():
    x = torch.randn(4, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return x, w


def _step(name, overrides, ckpt, x, w, sync):
    torch.manual_seed(0)
    model = s4v.create_model(name, 5, 4, **overrides).double()
    if sync:
        from s4v.train.sync_bn import convert_sync_token_bn

        convert_sync_token_bn(model.side)
        convert_sync_token_bn(model.head)
    model.set_grad_checkpointing(ckpt)
    model.train()
    out = model(x)
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    return out.detach(), grads, stats


def _worker(rank, world, port, name, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, w = _inputs()
    mine = slice(rank * 2, rank * 2 + 2)
    for setting, (overrides, ckpt) in SETTINGS.items():
        results[(rank, setting)] = _step(name, overrides, ckpt, x[mine], w[mine], sync=True)
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["s4v_tiny", "s4v_tiny_eva"])
def test_two_ranks_with_sync_bn_equal_one_process_with_the_whole_batch(name):
    x, w = _inputs()
    ref_out, ref_grads, ref_stats = _step(name, {}, False, x, w, sync=False)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), name, results), nprocs=2)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for setting in SETTINGS:
        (out0, g0, s0), (out1, g1, s1) = results[(0, setting)], results[(1, setting)]
        assert torch.allclose(torch.cat([out0, out1]), ref_out, atol=1e-10), setting
        for k, g in ref_grads.items():  # each rank's gradient is its share; the engine sums (averages) them
            assert (g0[k] + g1[k] - g).abs().max().item() <= 1e-10 * scale, (setting, k)
        for k, v in ref_stats.items():
            assert torch.allclose(s0[k], v, atol=1e-10) and torch.allclose(s1[k], v, atol=1e-10), (setting, k)
