"""BatchNorm with statistics over all ranks, for the side network's token BatchNorms.

torch's SyncBatchNorm needs CUDA in train mode and treats dim 1 as channels; the side network's
`TokenBatchNorm` normalises the last dim of `[B*T, N, D]`. This variant all-reduces (differentiably)
the per-channel sum, sum of squares and count, so results do not depend on the per-rank batch, on
gloo (CPU) as on NCCL. The fused (memory-saving) norm->linear functions of `s4v.model.layers` ask
`cross_rank_sum()` and synchronise their statistics and backward sums the same way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from s4v.model.layers import TokenBatchNorm, is_recomputing


class SyncTokenBatchNorm(TokenBatchNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        shape, dtype = x.shape, x.dtype
        compute = torch.promote_types(dtype, torch.float32)
        flat = x.reshape(-1, shape[-1]).to(compute)
        count = flat.new_full((1,), flat.shape[0])
        stats = torch.cat([flat.sum(0), (flat * flat).sum(0), count])
        stats = dist_fn.all_reduce(stats)  # differentiable: gradients flow to every rank's inputs
        d = shape[-1]
        n = stats[-1]
        mean = stats[:d] / n
        var = (stats[d:2 * d] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and not is_recomputing():
            with torch.no_grad():
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        out = (flat - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.to(compute) + self.bias.to(compute)
        return out.to(dtype).view(shape)


    def cross_rank_sum(self):
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        return dist.all_reduce  # in place, sum


def convert_sync_token_bn(module: nn.Module) -> nn.Module:
    """Swap every TokenBatchNorm in `module` for a SyncTokenBatchNorm sharing its tensors."""
    for name, child in module.named_children():
        if type(child) is TokenBatchNorm:
            child.__class__ = SyncTokenBatchNorm  # same state, same keys; only forward changes
        else:
            convert_sync_token_bn(child)
    return module
