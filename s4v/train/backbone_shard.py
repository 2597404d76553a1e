"""Shard the frozen image tower's weights across the ranks of each node (`model.shard_backbone`).

Every rank otherwise holds the whole frozen tower (ViT-E/14 in bf16: 8.7 GB). With this switch each
rank of a node keeps 1/n of it, and torch FSDP2 (`fully_shard`) all-gathers one block at a time for
the forward and frees it again afterwards. The tower has no gradients and no optimizer state, so
nothing else changes: the side network still sees the same taps. Sharding stays inside a node (fast
NVLink/PCIe all-gathers); every node holds a full copy across its ranks.
"""
from __future__ import annotations

import logging
import socket

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("s4v.train")


def tower_blocks(tower: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an open_clip CLIP tower or a timm Eva trunk."""
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if blocks is None:
        blocks = getattr(tower, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"cannot find the blocks of a {type(tower).__name__} tower to shard")
    return blocks


def node_groups() -> tuple[list[list[int]], list[int]]:
    """The ranks of each node (grouped by host name), and this rank's node. Collective."""
    hosts: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    order = sorted(set(hosts), key=hosts.index)
    groups = [[r for r, h in enumerate(hosts) if h == host] for host in order]
    return groups, groups[order.index(hosts[dist.get_rank()])]


def local_bytes(module: nn.Module) -> int:
    """Bytes of parameters this rank holds (the local shard of sharded ones)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def shard_frozen_tower(backbone: nn.Module, device: torch.device) -> int:
    """Shard `backbone.tower` (a `FrozenBackbone`'s) over this node's ranks; returns how many ranks
    share it. Call on every rank (collective); with one rank per node it leaves the tower as it is."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not dist.is_initialized() or dist.get_world_size() == 1:
        log.info("model.shard_backbone: a single process, nothing to shard")
        return 1
    groups, mine = node_groups()
    if len(mine) == 1:
        log.info("model.shard_backbone: one rank per node, nothing to shard")
        return 1
    group, _ = dist.new_subgroups_by_enumeration(groups)
    mesh = DeviceMesh.from_group(group, device.type, mesh=mine)
    tower = backbone.tower
    before = local_bytes(tower)
    for block in tower_blocks(tower):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(tower, mesh=mesh, reshard_after_forward=True)
    # FrozenBackbone calls `forward_intermediates`, not `forward`: gather the root's weights for it too.
    register_fsdp_forward_method(tower, "forward_intermediates")
    log.info("model.shard_backbone: frozen tower over %d ranks of this node: %.1f -> %.1f MiB per rank",
             len(mine), before / 2 ** 20, local_bytes(tower) / 2 ** 20)
    return len(mine)
