"""`train.compile`: torch.compile of the side network, and optionally of the frozen tower's forward.

Modules are compiled in place (`nn.Module.compile`), so parameter names, state dicts, checkpoints
and what DeepSpeed owns do not change. The side network's forward has no host syncs and no
data-dependent Python branches (tests compile it with `fullgraph=True`), so a compiled step can be
captured whole (CUDA graphs: `mode="reduce-overhead"` after the loop's per-step syncs are gone).
Shapes are static (`dynamic=False`): a batch of another size (the last eval batch) recompiles once.
"""
from __future__ import annotations

from typing import Literal

from torch import nn

CompileMode = Literal["none", "side", "side+tower"]


def compile_model(model: nn.Module, which: CompileMode, fullgraph: bool = False, mode: str | None = None) -> nn.Module:
    """Compile `model.side` (`which` "side"), and `model.backbone` too ("side+tower"); in place.

    `fullgraph`: fail on any graph break (a host sync or an untraceable op) instead of splitting the graph.
    """
    if which == "none":
        return model
    if which not in ("side", "side+tower"):
        raise ValueError(f"train.compile must be none, side or side+tower, got {which!r}")
    model.side.compile(dynamic=False, fullgraph=fullgraph, mode=mode)
    if which == "side+tower":
        model.backbone.compile(dynamic=False, fullgraph=fullgraph, mode=mode)
    return model
