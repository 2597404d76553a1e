"""Small building blocks of the side network: token BatchNorm, CLS shift, checkpointing helpers.

Tokens are kept batch-first and channels-last, `[B*T, N, D]`, so that BatchNorm, pointwise convs
(Linear) and attention need no layout copies.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

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
    running statistics are updated once per step and not twice. Under torch.compile the region is
    traced once and the recompute is the partitioner's (buffer updates are applied once, as graph
    outputs), so no context is passed there (inductor takes none but its own)."""
    if torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_checkpoint_contexts)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last (channel) dim of a tensor of any rank, e.g. `[B*T, N, D]`.

    Equal to the official BatchNorm3d on `[B, D, T, H, W]` (statistics over B*T*H*W) without the
    permute copies. Statistics are computed in fp32 whatever the input dtype, and running stats
    are left alone while a checkpointed forward is recomputed.
    """

    def _stats_for_forward(self):
        """(running_mean, running_var, momentum) for one training forward with batch statistics;
        counts the batch (unless recomputing, where the update goes to scratch copies)."""
        running_mean, running_var = self.running_mean, self.running_var
        if self.training and self.track_running_stats:
            if is_recomputing():  # same ops as the first forward, but the update goes to scratch copies
                running_mean, running_var = running_mean.clone(), running_var.clone()
            elif self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average
            momentum = 1.0 / float(self.num_batches_tracked) if self.num_batches_tracked else 0.0
        return running_mean, running_var, momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cross_rank_sum() is not None:  # statistics over all ranks: the fused functions' norm
            return NormOp(self, "bn").forward(x, self.weight, self.bias)[0]
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(-1, shape[-1])
        compute = torch.promote_types(dtype, torch.float32)
        use_batch_stats = self.training or self.running_mean is None
        running_mean, running_var, momentum = self._stats_for_forward()
        out = F.batch_norm(
            flat.to(compute), running_mean, running_var,
            None if self.weight is None else self.weight.to(compute),
            None if self.bias is None else self.bias.to(compute),
            use_batch_stats, momentum, self.eps)
        return out.to(dtype).view(shape)

    def fusable(self) -> bool:
        """Whether a fused norm->linear may replace this module here (batch statistics, autograd on)."""
        return self.training and torch.is_grad_enabled()

    def cross_rank_sum(self):
        """None: statistics of this rank's batch. A variant synchronised over ranks returns a function
        giving a tensor's sum over ranks, used for its statistics (`batch_moments`) and, in the fused
        functions, for their backward sums."""
        return None


def batch_moments(flat: torch.Tensor, sum_over_ranks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance, count) per channel of `flat` `[M, D]`, over every rank's rows."""
    d = flat.shape[-1]
    stats = sum_over_ranks(torch.cat([flat.sum(0), (flat * flat).sum(0), flat.new_full((1,), flat.shape[0])]))
    n = stats[-1]
    mean = stats[:d] / n
    return mean, (stats[d:2 * d] / n - mean * mean).clamp_min(0), n


@torch.no_grad()
def update_running_stats(running_mean, running_var, mean, var, n, momentum: float) -> None:
    """BatchNorm's running update (unbiased variance) from batch moments; nothing without running stats."""
    if running_mean is None:
        return
    unbiased = var * (n / (n - 1).clamp_min(1))
    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def normalize(flat: torch.Tensor, mean, invstd, weight=None, bias=None) -> torch.Tensor:
    out = (flat - mean) * invstd
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def shift_cls(cls_tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Temporal shift of the projected CLS tokens `[B*T, 1, D]` (docs/method.md 2.3).

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


# --------------------------------------------------------------------------------------------------
# Memory-saving fused autograd functions (spec switches `side.fused_taps`, `side.fused_norms`,
# `side.mlp_recompute`). Each computes exactly the ops of the plain module path in forward (same
# kernels, same dtype casts, autocast included), but keeps less for backward: a norm's output is
# recomputed from its input (cheap, elementwise), the MLP's GELU (or fc1 + GELU) is recomputed. Only
# `save_for_backward` is used, so saved-tensor hooks (and activation checkpointing) see everything.
# --------------------------------------------------------------------------------------------------

class NormOp:
    """What a fused function needs of a norm: forward (with statistics), recompute, backward.

    kind "ln": LayerNormFp32 over the last dim; "bn": TokenBatchNorm with batch statistics (train).
    Computes in (at least) fp32 and returns the input dtype, as the modules do.
    """

    def __init__(self, module: nn.Module, kind: str):
        self.kind, self.module = kind, module
        self.eps = module.eps
        self.sum_over_ranks = None
        if kind == "bn":
            self.running = module._stats_for_forward()  # (running_mean, running_var, momentum); bumps counters
            self.sum_over_ranks = module.cross_rank_sum()

    def forward(self, x, w, b):
        c = torch.promote_types(x.dtype, torch.float32)
        wc = None if w is None else w.to(c)
        bc = None if b is None else b.to(c)
        if self.kind == "ln":
            out, s1, s2 = torch.native_layer_norm(x.to(c), self.module.normalized_shape, wc, bc, self.eps)
            return out.to(x.dtype), (s1, s2)
        rm, rv, momentum = self.running
        flat = x.reshape(-1, x.shape[-1]).to(c)
        if self.sum_over_ranks is not None:
            mean, var, n = batch_moments(flat, self.sum_over_ranks)
            update_running_stats(rm, rv, mean, var, n, momentum)
            invstd = torch.rsqrt(var + self.eps)
            return normalize(flat, mean, invstd, wc, bc).to(x.dtype).view(x.shape), (mean, invstd)
        out, s1, s2 = torch.native_batch_norm(flat, wc, bc, rm, rv, True, momentum, self.eps)
        return out.to(x.dtype).view(x.shape), (s1, s2)

    def recompute(self, x, w, b, stats):
        c = torch.promote_types(x.dtype, torch.float32)
        wc = None if w is None else w.to(c)
        bc = None if b is None else b.to(c)
        if self.kind == "ln":
            return torch.native_layer_norm(x.to(c), self.module.normalized_shape, wc, bc, self.eps)[0].to(x.dtype)
        # batch statistics again, running statistics untouched: the same kernel and values as forward
        flat = x.reshape(-1, x.shape[-1]).to(c)
        if self.sum_over_ranks is not None:  # the saved global statistics (no second collective)
            return normalize(flat, stats[0], stats[1], wc, bc).to(x.dtype).view(x.shape)
        return torch.native_batch_norm(flat, wc, bc, None, None, True, 0.0, self.eps)[0].to(x.dtype).view(x.shape)

    def _global_backward(self, gy, x, wc, stats):
        """BatchNorm backward with statistics over all ranks: the sums over the batch that the input
        gradient needs are summed over ranks; weight and bias gradients stay this rank's (the engine
        averages them, as for any parameter)."""
        mean, invstd = stats
        d = x.shape[-1]
        g, xhat = gy.reshape(-1, d), (x.reshape(-1, d) - mean) * invstd
        gb, gw = g.sum(0), (g * xhat).sum(0)
        sums = self.sum_over_ranks(torch.cat([gb, gw, g.new_full((1,), g.shape[0])]))
        n = sums[-1]
        scale = invstd if wc is None else invstd * wc
        gx = scale * (g - sums[:d] / n - xhat * (sums[d:2 * d] / n))
        return gx.view(x.shape), gw, gb

    def backward(self, gy, x, w, b, stats, needs):
        c = torch.promote_types(x.dtype, torch.float32)
        wc = None if w is None else w.to(c)
        mask = [needs[0], w is not None and needs[1], b is not None and needs[2]]
        if self.kind == "ln":
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                gy.to(c), x.to(c), self.module.normalized_shape, stats[0], stats[1], wc,
                None if b is None else b.to(c), mask)
        elif self.sum_over_ranks is not None:
            gx, gw, gb = self._global_backward(gy.to(c), x.to(c), wc, stats)
        else:
            d = x.shape[-1]
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                gy.reshape(-1, d).to(c), x.reshape(-1, d).to(c), wc, None, None, stats[0], stats[1], True,
                self.eps, mask)
            gx = None if gx is None else gx.view(x.shape)
        return (None if gx is None else gx.to(x.dtype), None if gw is None else gw.to(w.dtype),
                None if gb is None else gb.to(b.dtype))


def _ac_dtype(device_type: str):
    """The autocast dtype a linear layer would run in here (None: no autocast)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _cast_in(y, w_dtype, ac):
    """The casts the module path applies to a linear's input: to the weight dtype (taps do this), then
    autocast's."""
    y = y.to(w_dtype)
    return y.to(ac) if ac is not None and y.dtype in (torch.float32, torch.float16, torch.bfloat16) else y


def _lin(y, w, b, ac):
    dt = y.dtype if ac is not None else w.dtype
    return F.linear(y, w.to(dt), None if b is None else b.to(dt))


def _lin_backward(g, y, w, b, needs_w, needs_b):
    """Gradients of `F.linear(y, w_cast, b_cast)` for input, weight and bias (in their own dtypes)."""
    g2 = g.reshape(-1, g.shape[-1])
    wc = w.to(g.dtype)
    gy = (g2 @ wc).view(*g.shape[:-1], w.shape[1])
    gw = (g2.t() @ y.reshape(-1, y.shape[-1]).to(g.dtype)).to(w.dtype) if needs_w else None
    gb = g2.sum(0).to(b.dtype) if (b is not None and needs_b) else None
    return gy, gw, gb


class _NormLinear(torch.autograd.Function):
    """`linear(norm(x))` keeping only `x` (in its own dtype) and the norm statistics."""

    @staticmethod
    def forward(ctx, x, nw, nb, w, b, norm: NormOp):
        dev = x.device.type
        ac = _ac_dtype(dev)
        with torch.autocast(dev, enabled=False):
            y, stats = norm.forward(x, nw, nb)
            out = _lin(_cast_in(y, w.dtype, ac), w, b, ac)
        ctx.norm, ctx.ac, ctx.has = norm, ac, (nw is not None, nb is not None, b is not None)
        ctx.save_for_backward(x, *stats, *(t for t in (nw, nb, w, b) if t is not None))
        return out

    @staticmethod
    def backward(ctx, g):
        x, s1, s2, *rest = ctx.saved_tensors
        it = iter(rest)
        nw = next(it) if ctx.has[0] else None
        nb = next(it) if ctx.has[1] else None
        w = next(it)
        b = next(it) if ctx.has[2] else None
        norm = ctx.norm
        y = norm.recompute(x, nw, nb, (s1, s2))
        yc = _cast_in(y, w.dtype, ctx.ac)
        nx, nnw, nnb, nw_, nb_, _ = ctx.needs_input_grad
        gyc, gw, gb = _lin_backward(g, yc, w, b, nw_, nb_)
        gy = gyc.to(w.dtype).to(y.dtype)
        gx, gnw, gnb = norm.backward(gy, x, nw, nb, (s1, s2), (nx, nnw, nnb))
        return gx, gnw, gnb, gw, gb, None


def norm_linear(x, norm_module: nn.Module, kind: str, linear: nn.Linear | tuple) -> torch.Tensor:
    """Fused `linear(norm(x))` (see `_NormLinear`); `linear` is an nn.Linear or a (weight, bias) pair."""
    w, b = (linear.weight, linear.bias) if isinstance(linear, nn.Module) else linear
    return _NormLinear.apply(x, norm_module.weight, norm_module.bias, w, b, NormOp(norm_module, kind))


class _HeadsLinear(torch.autograd.Function):
    """`linear(o.transpose(1, 2).reshape(B, N, H*hd))` for an attention output `o` `[B, H, N, hd]`,
    keeping `o` itself (which attention keeps anyway) instead of its reshaped copy."""

    @staticmethod
    def forward(ctx, o, w, b):
        dev = o.device.type
        ac = _ac_dtype(dev)
        with torch.autocast(dev, enabled=False):
            y = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
            out = _lin(y.to(ac) if ac is not None else y, w, b, ac)
        ctx.ac, ctx.has_b = ac, b is not None
        ctx.save_for_backward(o, w, *([b] if b is not None else []))
        return out

    @staticmethod
    def backward(ctx, g):
        o, w, *b = ctx.saved_tensors
        b = b[0] if b else None
        y = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
        y = y.to(ctx.ac) if ctx.ac is not None else y
        gy, gw, gb = _lin_backward(g, y, w, b, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        go = gy.to(o.dtype).view(o.shape[0], o.shape[2], o.shape[1], o.shape[3]).transpose(1, 2)
        return go, gw, gb


def heads_linear(o: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    return _HeadsLinear.apply(o, linear.weight, linear.bias)


class _NormMlp(torch.autograd.Function):
    """`fc2(gelu(fc1(norm(x))))` (norm optional). Backward keeps the norm's input `x` and statistics
    (without a norm: fc1's input as fc1 sees it) and, by `mode`: "none": fc1's and GELU's outputs (as
    autograd would); "gelu": fc1's output (GELU recomputed); "fc1": nothing more (fc1 and GELU
    recomputed)."""

    @staticmethod
    def forward(ctx, x, nw, nb, w1, b1, w2, b2, norm, mode):
        dev = x.device.type
        ac = _ac_dtype(dev)
        with torch.autocast(dev, enabled=False):
            if norm is not None:
                y, stats = norm.forward(x, nw, nb)
                y1 = _cast_in(y, w1.dtype, ac)
            else:
                stats = ()
                y1 = x.to(ac) if ac is not None else x
            h = _lin(y1, w1, b1, ac)
            a = F.gelu(h)
            out = _lin(a.to(ac) if ac is not None else a, w2, b2, ac)
        ctx.norm, ctx.ac, ctx.mode, ctx.nstats, ctx.x_dtype = norm, ac, mode, len(stats), x.dtype
        keep = {"none": (h, a), "gelu": (h,), "fc1": ()}[mode]
        ctx.nkeep = len(keep)
        empty = x.new_empty(0)
        ctx.save_for_backward(x if norm is not None else y1, *stats, *keep,
                              empty if nw is None else nw, empty if nb is None else nb, w1, b1, w2, b2)
        ctx.has_nw, ctx.has_nb = nw is not None, nb is not None
        return out

    @staticmethod
    def backward(ctx, g):
        saved = list(ctx.saved_tensors)
        x = saved.pop(0)
        stats = tuple(saved[:ctx.nstats])
        del saved[:ctx.nstats]
        keep = saved[:ctx.nkeep]
        del saved[:ctx.nkeep]
        nw, nb, w1, b1, w2, b2 = saved
        nw = nw if ctx.has_nw else None
        nb = nb if ctx.has_nb else None
        norm, ac = ctx.norm, ctx.ac
        if norm is not None:
            y = norm.recompute(x, nw, nb, stats)
            y1 = _cast_in(y, w1.dtype, ac)
        else:
            y1 = x
        h = _lin(y1, w1, b1, ac) if ctx.mode == "fc1" else keep[0]
        a = keep[1] if ctx.mode == "none" else F.gelu(h)
        need = ctx.needs_input_grad
        ga, gw2, gb2 = _lin_backward(g, a.to(ac) if ac is not None else a, w2, b2, need[5], need[6])
        gh = torch.ops.aten.gelu_backward(ga.to(h.dtype), h)
        gy1, gw1, gb1 = _lin_backward(gh, y1, w1, b1, need[3], need[4])
        if norm is not None:
            gx, gnw, gnb = norm.backward(gy1.to(w1.dtype).to(y.dtype), x, nw, nb, stats, need[:3])
        else:
            gx, gnw, gnb = gy1.to(ctx.x_dtype), None, None
        return gx, gnw, gnb, gw1, gb1, gw2, gb2, None, None


def norm_mlp(x, norm_module: Optional[nn.Module], fc1: nn.Linear, fc2: nn.Linear, mode: str) -> torch.Tensor:
    norm = NormOp(norm_module, "bn") if norm_module is not None else None
    nw = norm_module.weight if norm_module is not None else None
    nb = norm_module.bias if norm_module is not None else None
    return _NormMlp.apply(x, nw, nb, fc1.weight, fc1.bias, fc2.weight, fc2.bias, norm, mode)
