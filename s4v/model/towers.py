"""Tower families: how each frozen image tower is built (open_clip or timm), how its per-layer tokens
are read (`forward_intermediates`), which prefix tokens it has, what it normalises its input with,
how its own image embedding is made (for retrieval) and how its usual weights files are read.

| family  | library                   | prefix tokens   | positions   | embedding head (retrieval)         |
|---------|---------------------------|-----------------|-------------|------------------------------------|
| clip    | open_clip VisionTransformer | CLS           | absolute    | CLS -> ln_post -> proj             |
| eva     | timm Eva (EVA02-CLIP)     | CLS             | abs (+RoPE for B/L) | CLS -> norm -> head        |
| pe      | timm Eva (PE-Core)        | CLS, or none (G/14) | abs + RoPE | norm -> attention pool -> head |
| siglip2 | timm VisionTransformer    | none            | absolute    | norm -> attention pool             |
| dinov2  | timm VisionTransformer    | CLS (+registers) | absolute   | (no text tower)                    |
| dinov3  | timm Eva                  | CLS + 4 registers | RoPE      | (no text tower)                    |

The side network gets one global token per layer (docs/method.md 10.2): the CLS token where the tower
has one (registers are left out), else the mean of the layer's patch tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .specs import BackboneSpec

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FamilyInfo:
    library: str  # "open_clip": its own VisionTransformer; "timm": a timm trunk (open_clip wraps it as visual.trunk)
    timm_class: str  # "Eva" | "VisionTransformer" (their register-token keyword differs); "" for open_clip
    mean: tuple[float, float, float]  # input normalisation the tower was trained with
    std: tuple[float, float, float]
    # the tower's embedding: "clip" (ln_post/proj), "token" (norm/head on CLS), "map" (attention pool), "none"
    head: str


FAMILIES: dict[str, FamilyInfo] = {
    "clip": FamilyInfo("open_clip", "", OPENAI_MEAN, OPENAI_STD, "clip"),
    "eva": FamilyInfo("timm", "Eva", OPENAI_MEAN, OPENAI_STD, "token"),
    "pe": FamilyInfo("timm", "Eva", HALF, HALF, "map"),
    "siglip2": FamilyInfo("timm", "VisionTransformer", HALF, HALF, "map"),
    "dinov2": FamilyInfo("timm", "VisionTransformer", IMAGENET_MEAN, IMAGENET_STD, "none"),
    "dinov3": FamilyInfo("timm", "Eva", IMAGENET_MEAN, IMAGENET_STD, "none"),
}


def family_info(family: str) -> FamilyInfo:
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r} (expected one of {', '.join(FAMILIES)})")
    return FAMILIES[family]


def timm_name(spec: BackboneSpec) -> str:
    """The timm model of a timm-built tower: `spec.timm_name`, else the one open_clip's config names."""
    if spec.timm_name:
        return spec.timm_name
    import open_clip

    cfg = open_clip.get_model_config(spec.open_clip_name)
    if cfg is None or "timm_model_name" not in cfg.get("vision_cfg", {}):
        raise ValueError(f"{spec.family} tower: open_clip has no timm config {spec.open_clip_name!r}; "
                         "set backbone.timm_name")
    return cfg["vision_cfg"]["timm_model_name"]


def _timm_head_kwargs(spec: BackboneSpec) -> dict:
    """`num_classes` / `global_pool` as open_clip's TimmModel builds the trunk (its state dict layout)."""
    if spec.family == "eva":  # unchanged since the first EVA tower: the trunk's own pooling, a head to embed_dim
        return dict(num_classes=spec.embed_dim)
    if not spec.open_clip_name:
        return dict(num_classes=0)
    import open_clip

    vision = open_clip.get_model_config(spec.open_clip_name)["vision_cfg"]
    proj = vision.get("timm_proj", "linear")
    return dict(num_classes=0 if proj == "none" else spec.embed_dim, global_pool=vision.get("timm_pool", "avg"))


def build_tower(spec: BackboneSpec, taps: list[int], keep_head: bool = False) -> nn.Module:
    """Build the tower on the current default device (use `with torch.device(...)`), random init."""
    info = family_info(spec.family)
    if info.library == "open_clip":
        import open_clip
        from open_clip.model import _build_vision_tower  # builds only the image tower of a CLIP config

        vision_cfg = dict(image_size=spec.image_size, patch_size=spec.patch_size, width=spec.width,
                          layers=spec.layers, head_width=spec.width // spec.heads, mlp_ratio=spec.mlp_ratio)
        quick_gelu = open_clip.get_model_config(spec.open_clip_name).get("quick_gelu", False)
        tower = _build_vision_tower(spec.embed_dim, vision_cfg, quick_gelu=quick_gelu)
    else:
        import timm

        # open_clip's EVA02, PE-Core and SigLIP2 towers are timm trunks; build the same trunk at the
        # requested size (the family's block type, norms, prefix tokens and position scheme are kept).
        kwargs = dict(img_size=spec.image_size, patch_size=spec.patch_size, embed_dim=spec.width,
                      depth=spec.layers, num_heads=spec.heads, mlp_ratio=spec.mlp_ratio, **_timm_head_kwargs(spec))
        if spec.family != "eva":
            reg = "num_reg_tokens" if info.timm_class == "Eva" else "reg_tokens"
            kwargs.update(class_token=spec.class_token, **{reg: spec.reg_tokens})
        tower = timm.create_model(timm_name(spec), pretrained=False, **kwargs)
    if not keep_head:  # not keeping anything the side network does not need
        tower.prune_intermediate_layers(taps, prune_norm=True, prune_head=True)
    return tower


@torch.no_grad()
def tapped_tokens(tower: nn.Module, spec: BackboneSpec, x: torch.Tensor,
                  taps: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per tapped layer (global token `[B, 1, W]`, patch tokens `[B, N, W]`): raw block outputs, before
    any final norm. The global token is the CLS token, or the patch mean for a tower without one."""
    if family_info(spec.family).library == "open_clip":
        out = tower.forward_intermediates(
            x, indices=taps, stop_early=True, intermediates_only=True, output_fmt="NLC",
            output_extra_tokens=True)
        return list(zip(out["image_intermediates_prefix"], out["image_intermediates"]))
    # (timm's Eva fails on return_prefix_tokens=True when there are none: ask only when there are)
    out = tower.forward_intermediates(
        x, indices=taps, return_prefix_tokens=tower.num_prefix_tokens > 0, norm=False, stop_early=True,
        output_fmt="NLC", intermediates_only=True)
    if spec.class_token:
        return [(prefix[:, :1], patches) for patches, prefix in out]  # CLS first, registers dropped
    patches = [p[0] if isinstance(p, tuple) else p for p in out]
    return [(p.mean(dim=1, keepdim=True), p) for p in patches]


def position_scheme(tower: nn.Module) -> str:
    """"absolute", "rope" or "absolute+rope", read off a built tower."""
    parts = []
    if getattr(tower, "pos_embed", None) is not None or getattr(tower, "positional_embedding", None) is not None:
        parts.append("absolute")
    if getattr(tower, "rope", None) is not None:
        parts.append("rope")
    return "+".join(parts) or "none"


def adapt_tower_state_dict(tower: nn.Module, spec: BackboneSpec,
                           sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn a timm/Meta-format file of a new-family tower into the tower's own layout with timm's own
    converter (e.g. DINOv2/DINOv3 originals), and resample absolute position embeddings saved at another
    resolution (a DINOv2 file at 518px into a 224px tower). The paper's CLIP and EVA towers are left alone."""
    if spec.family in ("clip", "eva"):
        return sd
    expected = tower.state_dict()
    if all(k in sd and sd[k].shape == v.shape for k, v in expected.items()):
        return sd
    if family_info(spec.family).timm_class == "Eva":
        from timm.models.eva import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
    with torch.device("cpu"):
        return checkpoint_filter_fn(dict(sd), tower)


class MapHead(nn.Module):
    """A timm tower's own embedding head taken out of it: final norm, attention pooling (MAP), fc_norm,
    projection. Used by retrieval for towers without a CLS token (or pooling by attention, PE-Core):
    the zero-initialised side feature is added to every token the pooling reads."""

    def __init__(self, tower: nn.Module, class_token: bool):
        super().__init__()
        self.class_token = class_token
        self.norm, self.attn_pool = tower.norm, tower.attn_pool
        self.fc_norm, self.head = tower.fc_norm, tower.head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, M, W]` last-layer tokens (prefix + patches) -> `[B, E]`."""
        x = self.attn_pool(self.norm(tokens.to(self.norm.weight.dtype)))
        return self.head(self.fc_norm(x))

    def embed(self, global_token: torch.Tensor, patches: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """Frame embeddings from the last tap (global `[B, 1, W]`, patches `[B, N, W]`) plus the side
        feature `[B, W]`."""
        tokens = torch.cat([global_token, patches], dim=1) if self.class_token else patches
        return self(tokens.to(side.dtype) + side[:, None])

    def checkpoint_keys(self) -> dict[str, str]:
        """Our key -> the tower's key (the same names: these are the tower's own modules)."""
        return {k: k for k in self.state_dict()}
