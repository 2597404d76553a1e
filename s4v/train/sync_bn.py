"""BatchNorm with statistics over all ranks, for the side network's token BatchNorms.

torch's SyncBatchNorm needs CUDA in train mode and treats dim 1 as channels; the side network's
`TokenBatchNorm` normalises the last dim of `[B*T, N, D]`. This variant all-reduces (differentiably)
the per-channel sum, sum of squares and count, so results do not depend on the per-rank batch, on
gloo (CPU) as on NCCL. The fused (memory-saving) norm->linear functions of `s4v.model.layers` ask
`cross_rank_sum()` and synchronise their statistics and backward sums the same way.
"""
from __future__ import annotations

import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from s4v.model.layers import TokenBatchNorm


class SyncTokenBatchNorm(TokenBatchNorm):
    """Only says how to sum over ranks; TokenBatchNorm (and the fused functions) then use it."""

    def cross_rank_sum(self):
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        return dist_fn.all_reduce  # sum, differentiable: gradients flow to every rank's inputs


def convert_sync_token_bn(module: nn.Module) -> nn.Module:
    """Swap every TokenBatchNorm in `module` for a SyncTokenBatchNorm sharing its tensors."""
    for name, child in module.named_children():
        if type(child) is TokenBatchNorm:
            child.__class__ = SyncTokenBatchNorm  # same state, same keys; only forward changes
        else:
            convert_sync_token_bn(child)
    return module
