"""Small building blocks of the side network: token BatchNorm, CLS shift, checkpointing helpers.

Tokens are kept batch-first and channels-last, `[B*T, N, D]`, so that BatchNorm, pointwise convs
(Linear) and attention need no layout copies.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_recompute = threading.local()


def is_recomputing() -> bool:
    """True while activation checkpointing re-runs a forward inside backward."""
    return getattr(_recompute, "active", False)


@contextlib.contextmanager
def _recompute_scope():
    prev = is_recomputing()
    _recompute.active = True
    try:
        yield
    finally:
        _recompute.active = prev


def _checkpoint_contexts():
    return contextlib.nullcontext(), _recompute_scope()


def checkpointed(fn, *args):
    """`torch.utils.checkpoint` (non-reentrant) that tells BatchNorm it is being recomputed, so the
    running statistics are updated once per step and not twice."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_checkpoint_contexts)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last (channel) dim of a tensor of any rank, e.g. `[B*T, N, D]`.

    Equal to the official BatchNorm3d on `[B, D, T, H, W]` (statistics over B*T*H*W) without the
    permute copies. Statistics are computed in fp32 whatever the input dtype, and running stats
    are left alone while a checkpointed forward is recomputed.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(-1, shape[-1])
        compute = torch.promote_types(dtype, torch.float32)
        use_batch_stats = self.training or self.running_mean is None
        running_mean, running_var = self.running_mean, self.running_var
        if self.training and self.track_running_stats:
            if is_recomputing():  # same ops as the first forward, but the update goes to scratch copies
                running_mean, running_var = running_mean.clone(), running_var.clone()
            elif self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average
            momentum = 1.0 / float(self.num_batches_tracked) if self.num_batches_tracked else 0.0
        out = F.batch_norm(
            flat.to(compute), running_mean, running_var,
            None if self.weight is None else self.weight.to(compute),
            None if self.bias is None else self.bias.to(compute),
            use_batch_stats, momentum, self.eps)
        return out.to(dtype).view(shape)


def shift_cls(cls_tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Temporal shift of the projected CLS tokens `[B*T, 1, D]` (spec 2.3).

    Channels `[0, D//2)` of frame t take frame t+1's value, channels `[D//2, D)` take frame t-1's;
    the clip ends get zeros. Frame t's own CLS is not kept.
    """
    bt, one, dim = cls_tokens.shape
    c = cls_tokens.view(bt // num_frames, num_frames, dim)
    half = dim // 2
    out = torch.zeros_like(c)
    out[:, :-1, :half] = c[:, 1:, :half]
    out[:, 1:, half:] = c[:, :-1, half:]
    return out.view(bt, one, dim)


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in (at least) fp32, returning the input dtype (CLIP's LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        out = F.layer_norm(x.to(compute), self.normalized_shape,
                           None if self.weight is None else self.weight.to(compute),
                           None if self.bias is None else self.bias.to(compute), self.eps)
        return out.to(x.dtype)
