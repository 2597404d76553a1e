"""BertAdam, the optimiser of the official retrieval recipe (docs/method.md 6.2, CLIP4Clip's `optimization.py`).

Adam without bias correction and with decoupled weight decay (added to the update, scaled by the lr,
as AdamW). The learning-rate schedule is left to the LR scheduler (`optim.schedule: cosine_global`
gives the official warmup-cosine over global progress).

The official optimiser also clips each parameter's gradient norm at 1.0 inside `step`. It runs after
the loop's global clipping at 1.0, and a parameter's norm never exceeds the global norm, so that clip
never acts; it is left out, which also lets ZeRO hand this optimiser flattened partitions (every
operation here is elementwise, so flattening does not change the result).
"""
from __future__ import annotations

from typing import Iterable

import torch


class BertAdam(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"BertAdam: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float() if p.grad.dtype != p.dtype else p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                update = m / (v.sqrt() + group["eps"])  # no bias correction
                if group["weight_decay"] > 0:
                    update.add_(p, alpha=group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
        return loss
