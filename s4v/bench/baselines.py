"""Baselines for the memory and throughput benchmarks, built on the same open_clip/timm towers as s4v.

- `full-finetune`: the whole image tower trains; frame features (the tower's pooled, projected output)
  are averaged over the clip and classified by a linear layer.
- `st-adapter`: an ST-Adapter-like model: before every block, a bottleneck adapter (down-projection to
  W/2, temporal depthwise conv with kernel 3 over the frames, up-projection, zero-initialised) is added
  to the patch tokens. The tower is frozen but back-propagated through, as in ST-Adapter and AIM.
- `linear-probe`: the frozen tower runs without autograd; only the linear classifier trains.

Same input and output as `Side4VideoClassifier`: video `[B, T, 3, H, W]` -> logits `[B, classes]`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from s4v.model.backbone import build_tower, resolve_dtype
from s4v.model.specs import BackboneSpec, get_spec

KINDS = ("full-finetune", "st-adapter", "linear-probe")


def _blocks(tower: nn.Module) -> nn.ModuleList:
    if hasattr(tower, "transformer"):  # open_clip VisionTransformer
        return tower.transformer.resblocks
    return tower.blocks  # timm Eva


class TemporalAdapter(nn.Module):
    """ST-Adapter: x + up(dwconv_t(down(x))) on the patch tokens; the prefix (CLS) tokens pass through."""

    def __init__(self, width: int, num_frames: int, prefix: int, ratio: float = 0.5, kernel: int = 3):
        super().__init__()
        hidden = int(width * ratio)
        self.num_frames, self.prefix = num_frames, prefix
        self.down = nn.Linear(width, hidden)
        self.conv = nn.Conv3d(hidden, hidden, (kernel, 1, 1), padding=(kernel // 2, 0, 0), groups=hidden)
        self.up = nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bt, m, w = x.shape
        t = self.num_frames
        prefix, patches = x[:, :self.prefix], x[:, self.prefix:]
        h = self.down(patches)  # [B*T, N, C]
        n, c = h.shape[1], h.shape[2]
        h = h.view(bt // t, t, n, c).permute(0, 3, 1, 2).unsqueeze(-1)  # [B, C, T, N, 1]
        h = self.conv(h).squeeze(-1).permute(0, 2, 3, 1).reshape(bt, n, c)
        return torch.cat([prefix, patches + self.up(h)], dim=1)


class AdaptedBlock(nn.Module):
    def __init__(self, block: nn.Module, adapter: TemporalAdapter):
        super().__init__()
        self.block, self.adapter = block, adapter

    def forward(self, x, *args, **kwargs):
        return self.block(self.adapter(x), *args, **kwargs)


class FrameMeanClassifier(nn.Module):
    """tower -> per-frame pooled features -> mean over frames -> linear."""

    def __init__(self, kind: str, spec: BackboneSpec, num_classes: int, num_frames: int):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown baseline {kind!r}; choose from {', '.join(KINDS)}")
        self.kind, self.spec, self.num_frames = kind, spec, num_frames
        self.tower = build_tower(spec, [spec.layers - 1], keep_head=True)
        self.tower.requires_grad_(kind == "full-finetune")
        if kind == "st-adapter":
            blocks = _blocks(self.tower)
            prefix = 1
            for i, blk in enumerate(blocks):
                blocks[i] = AdaptedBlock(blk, TemporalAdapter(spec.width, num_frames, prefix))
        self.head = nn.Linear(spec.embed_dim, num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.eval()  # no dropout in any of them; a frozen tower stays frozen
        return self

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, t = video.shape[:2]
        frames = video.flatten(0, 1)
        dtype = next(self.tower.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.kind != "linear-probe"):
            feats = self.tower(frames.to(dtype))
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        feats = feats.view(b, t, -1).mean(dim=1)
        return self.head(feats.to(self.head.weight.dtype))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)


def create_baseline(kind: str, model: str, num_classes: int, num_frames: int = 8, device=None,
                    backbone_dtype: Optional[str | torch.dtype] = None) -> FrameMeanClassifier:
    """A baseline on the tower of s4v model `model`, random weights. `backbone_dtype` applies to frozen
    towers only (full fine-tuning keeps fp32 master weights and uses autocast)."""
    spec = get_spec(model).backbone
    with torch.device(device or "cpu"):
        m = FrameMeanClassifier(kind, spec, num_classes, num_frames)
    dtype = resolve_dtype(backbone_dtype)
    if dtype is not None and kind != "full-finetune":  # frozen weights in half precision; adapters stay fp32
        for p in m.tower.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    return m


def categorize(path: str, module: nn.Module) -> Optional[str]:
    parts = path.split(".")
    if "adapter" in parts:
        return "adapter"
    if parts[0] == "head":
        return "head"
    if parts[0] == "tower" and len(parts) == 1:
        return "backbone"
    return None
