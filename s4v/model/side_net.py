"""The Side4Video spatial-temporal side network (docs/method.md 2.2-2.4 and 4).

Pure `nn.Module`s that know only tensors. Token layout is `[B*T, N, D]` (frame-major within a
clip); the side stream never carries a CLS token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (LayerNormFp32, TokenBatchNorm, checkpointed, heads_linear, norm_linear, norm_mlp,
                     shift_cls)
from .specs import SideSpec


class Stem(nn.Module):
    """Conv3d patch embedding of the raw frames, kernel (k_t, p, p), then BN3d."""

    def __init__(self, dim: int, patch_size: int, temporal_kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv3d(3, dim, (temporal_kernel, patch_size, patch_size),
                              stride=(1, patch_size, patch_size), padding=(temporal_kernel // 2, 0, 0))
        self.bn = TokenBatchNorm(dim)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """`[B, T, 3, H, W]` -> tokens `[B*T, N, D]`."""
        b, t = video.shape[:2]
        x = self.conv(video.transpose(1, 2))  # [B, D, T, h, w]
        x = x.flatten(3).permute(0, 2, 3, 1).reshape(b * t, -1, x.shape[1])
        return self.bn(x)


class Tap(nn.Module):
    """Projects one backbone layer's tokens (width W) to the side width D.

    CLIP: LN(W) then Linear (the LN input, the backbone token, is what backward keeps);
    EVA: Linear then LN(D).
    """

    def __init__(self, backbone_width: int, dim: int, order: str, fused: bool = False):
        super().__init__()
        self.order = order
        self.fused = fused  # keep only the backbone token for backward (LN output recomputed)
        self.norm = LayerNormFp32(backbone_width if order == "norm_linear" else dim)
        self.proj = nn.Linear(backbone_width, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.order == "norm_linear":
            if self.fused and torch.is_grad_enabled():
                return norm_linear(tokens, self.norm, "ln", self.proj)
            return self.proj(self.norm(tokens).to(self.proj.weight.dtype))
        return self.norm(self.proj(tokens.to(self.proj.weight.dtype)))


class TemporalConv(nn.Module):
    """Pointwise -> depthwise temporal (k, 1, 1) -> pointwise conv, no activation (docs/method.md 2.3)."""

    def __init__(self, dim: int, hidden: int, kernel: int = 3):
        super().__init__()
        self.pw1 = nn.Linear(dim, hidden)
        self.dw = nn.Conv2d(hidden, hidden, (kernel, 1), padding=(kernel // 2, 0), groups=hidden)
        self.pw2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, num_frames: int, norm: TokenBatchNorm | None = None,
                fused: bool = False) -> torch.Tensor:
        """`norm`: a BatchNorm applied first (fused into pw1 with `fused`, keeping only its input)."""
        bt, n, _ = x.shape
        if norm is not None and fused and norm.fusable():
            h = norm_linear(x, norm, "bn", self.pw1)
        else:
            h = self.pw1(norm(x) if norm is not None else x)
        h = h.view(bt // num_frames, num_frames, n, -1)
        # [B, T, N, C] seen as a channels-last [B, C, T, N] image: a (k, 1) conv is a temporal conv.
        h = self.dw(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(bt, n, -1)
        return self.pw2(h)


class SideAttention(nn.Module):
    """Per-frame multi-head attention: queries are the patch tokens, keys/values are the shifted
    CLS token plus the patch tokens. Fused through `scaled_dot_product_attention`."""

    def __init__(self, dim: int, heads: int, kind: str = "sdpa", fused: bool = False):
        super().__init__()
        self.heads = heads
        self.kind = kind  # "sdpa": fused attention; "math": softmax probabilities materialised (and kept)
        self.fused = fused  # LN->qkv and out->proj keep only the LN input and the attention output
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """`z`: `[B*T, 1+N, D]` (shifted CLS first) -> `[B*T, N, D]`; `norm`: a LayerNorm applied first."""
        bt, m, dim = z.shape
        hd = dim // self.heads
        fused = self.fused and torch.is_grad_enabled()
        if norm is not None and fused:  # one qkv matmul over all tokens; the CLS row's query is dropped
            qkv = norm_linear(z, norm, "ln", self.qkv)
            q = qkv[:, 1:, :dim].view(bt, m - 1, self.heads, hd).transpose(1, 2)
            k, v = qkv[..., dim:].view(bt, m, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        else:
            if norm is not None:
                z = norm(z)
            w_q, w_kv = self.qkv.weight.split([dim, 2 * dim])
            b_q, b_kv = self.qkv.bias.split([dim, 2 * dim])
            q = F.linear(z[:, 1:], w_q, b_q).view(bt, m - 1, self.heads, hd).transpose(1, 2)
            k, v = F.linear(z, w_kv, b_kv).view(bt, m, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        if self.kind == "math":
            attn = torch.softmax((q * hd ** -0.5) @ k.transpose(-2, -1), dim=-1)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        if fused:
            return heads_linear(out, self.proj)
        return self.proj(out.transpose(1, 2).reshape(bt, m - 1, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, recompute: str = "none"):
        super().__init__()
        self.recompute = recompute  # "none" | "gelu" | "fc1": what backward recomputes instead of keeping
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, norm: TokenBatchNorm | None = None, fused_norm: bool = False) -> torch.Tensor:
        """`norm`: a BatchNorm applied first (with `fused_norm`, only its input is kept for backward)."""
        fuse_norm = norm is not None and fused_norm and norm.fusable()
        if torch.is_grad_enabled() and (fuse_norm or self.recompute != "none"):
            if norm is not None and not fuse_norm:
                x, norm = norm(x), None
            return norm_mlp(x, norm, self.fc1, self.fc2, self.recompute)
        if norm is not None:
            x = norm(x)
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU, not QuickGELU


class SideBlock(nn.Module):
    """One side block: temporal conv, CLS-prompted spatial attention, MLP, each residual.

    pre-norm (CLIP):  s += TC(BN1(s));  s += Attn(LN([shift(c); s+P]));  s += MLP(BN2(s))
    post-norm (EVA):  s += BN1(TC(s));  s += LN(Attn([shift(c); s+P]));  s += BN2(MLP(s))
    """

    def __init__(self, dim: int, spec: SideSpec):
        super().__init__()
        self.post_norm = spec.block_norm == "post"
        self.cls_shift = spec.cls_shift
        self.fused_norms = spec.fused_norms
        self.bn1 = TokenBatchNorm(dim)
        self.temporal = TemporalConv(dim, round(dim * spec.temporal_ratio), spec.temporal_kernel)
        self.ln = LayerNormFp32(dim)
        self.attn = SideAttention(dim, spec.num_heads, spec.attention, spec.fused_norms)
        self.bn2 = TokenBatchNorm(dim)
        self.mlp = Mlp(dim, round(dim * spec.mlp_ratio), spec.mlp_recompute)

    def forward(self, s: torch.Tensor, cls_tokens: torch.Tensor, pos: torch.Tensor,
                num_frames: int) -> torch.Tensor:
        z_cls = shift_cls(cls_tokens, num_frames) if self.cls_shift else cls_tokens
        if self.post_norm:
            s = s + self.bn1(self.temporal(s, num_frames))
            s = s + self.ln(self.attn(_prompted(z_cls, s, pos)))
            return s + self.bn2(self.mlp(s))
        s = s + self.temporal(s, num_frames, self.bn1, self.fused_norms)
        s = s + self.attn(_prompted(z_cls, s, pos), self.ln)
        return s + self.mlp(s, self.bn2, self.fused_norms)


def _prompted(z_cls: torch.Tensor, s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The attention input `[shifted CLS; patches]` plus the position embedding: on the patches only
    (recognition, `N` rows) or on every token (retrieval, `N + 1` rows)."""
    if pos.shape[0] == s.shape[1]:
        return torch.cat([z_cls, s + pos], dim=1)
    return torch.cat([z_cls, s], dim=1) + pos


class SideNetwork(nn.Module):
    """Stem, one tap per tapped backbone layer, one side block per tap, shared position embedding."""

    def __init__(self, spec: SideSpec, backbone_width: int, patch_size: int, num_patches: int,
                 num_taps: int):
        super().__init__()
        dim = spec.width
        self.spec = spec
        self.stem = Stem(dim, patch_size, spec.temporal_kernel)
        self.taps = nn.ModuleList(Tap(backbone_width, dim, spec.tap_order, spec.fused_taps)
                                  for _ in range(num_taps))
        self.blocks = nn.ModuleList(SideBlock(dim, spec) for _ in range(num_taps))
        self.pos_embed = nn.Parameter(torch.empty(num_patches + int(spec.cls_pos), dim))
        self.grad_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation as the official code ends up doing it (docs/method.md 2.4 and 4)."""
        nn.init.normal_(self.pos_embed, std=self.spec.pos_init_std)
        if self.spec.init != "clip":
            return
        dim = self.spec.width
        proj_std = dim ** -0.5 * 24 ** -0.5  # the official constant 24 (2 x 12 layers) for every size
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=dim ** -0.5)
            nn.init.zeros_(blk.attn.qkv.bias)  # nn.MultiheadAttention's in_proj_bias init
            nn.init.normal_(blk.attn.proj.weight, std=proj_std)
            nn.init.zeros_(blk.attn.proj.bias)
            nn.init.normal_(blk.mlp.fc1.weight, std=(2 * dim) ** -0.5)
            nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)

    def forward(self, video: torch.Tensor, taps: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """`video` `[B, T, 3, H, W]`; `taps`: per tapped layer, (CLS `[B*T, 1, W]`, patches `[B*T, N, W]`)
        from the frozen backbone. Returns side tokens `[B*T, N, D]`."""
        num_frames = video.shape[1]
        s = self.stem(video.to(self.stem.conv.weight.dtype))
        for tap, block, (cls_tok, patches) in zip(self.taps, self.blocks, taps, strict=True):
            if self.grad_checkpointing and torch.is_grad_enabled():
                s = checkpointed(self._layer, tap, block, s, cls_tok, patches, num_frames)
            else:
                s = self._layer(tap, block, s, cls_tok, patches, num_frames)
        return s

    def _layer(self, tap: Tap, block: SideBlock, s, cls_tok, patches, num_frames: int):
        s = 0.5 * s + 0.5 * tap(patches)  # fusion: an average, before the block
        return block(s, tap(cls_tok), self.pos_embed.to(s.dtype), num_frames)


class RecognitionHead(nn.Module):
    """Optional BN3d, mean over T*H*W, dropout, linear classifier."""

    def __init__(self, dim: int, num_classes: int, post_bn: bool, drop: float = 0.0):
        super().__init__()
        self.bn = TokenBatchNorm(dim) if post_bn else None
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, s: torch.Tensor, batch: int) -> torch.Tensor:
        if self.bn is not None:
            s = self.bn(s)
        pooled = s.reshape(batch, -1, s.shape[-1]).mean(dim=1)
        return self.fc(self.drop(pooled).to(self.fc.weight.dtype))



