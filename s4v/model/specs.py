"""Named model sizes: the frozen tower and the side network of every s4v model, as plain data.

Sizes follow the Side4Video spec (sections 2.1 and 4). Tiny sizes sit beside the real ones and are
used by the tests and the demo.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Literal, Optional

Family = Literal["clip", "eva"]


@dataclass(frozen=True)
class BackboneSpec:
    """A frozen image tower. `open_clip_name` picks open_clip's config; the other fields override it."""

    family: Family  # "clip": OpenAI CLIP ViT (pre-norm, QuickGELU); "eva": EVA02-CLIP (post-norm timm Eva)
    open_clip_name: str  # e.g. "ViT-B-16-quickgelu", "EVA02-E-14"
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512  # output projection width (unused by recognition, kept for retrieval)
    keep_head: bool = False  # keep the final norm/projection; recognition never runs them

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class SideSpec:
    """The trainable spatial-temporal side network (spec sections 2.3, 4)."""

    width: int  # side width D
    tap_every: int = 1  # 1: a tap after every backbone layer (CLIP); 2: after odd layers 1,3,... (EVA-E)
    tap_order: Literal["norm_linear", "linear_norm"] = "norm_linear"  # CLIP: LN(W)->Linear; EVA: Linear->LN(D)
    block_norm: Literal["pre", "post"] = "pre"  # CLIP blocks are pre-norm, EVA blocks post-norm
    post_bn: bool = True  # BN3d before the pooling of the recognition head (absent for EVA)
    heads: Optional[int] = None  # default: width // 64, as the official code
    mlp_ratio: float = 4.0
    temporal_ratio: float = 1.0  # bottleneck width of the temporal conv branch, as a multiple of D
    temporal_kernel: int = 3  # temporal kernel of the stem and of the depthwise conv (1: none)
    cls_shift: bool = True  # shift the projected CLS across frames (False: each frame keeps its own)
    cls_pos: bool = False  # the position embedding also covers the CLS prompt (N+1 rows; retrieval, spec 5.1)
    pos_init_std: float = 0.01  # side spatial position embedding init (CLIP 0.01, EVA 0.02)
    init: Literal["clip", "default"] = "clip"  # "clip": the official CLIP block init; "default": PyTorch's
    drop_fc: float = 0.0  # dropout before the classifier
    # Memory savings (docs/performance.md). None changes what is computed; each only changes what is
    # kept for backward (and recomputed there), so logits and gradients are the same either way.
    attention: Literal["sdpa", "math"] = "sdpa"  # "math": materialised softmax probabilities (official)
    fused_taps: bool = True  # tap LN->Linear keeps only the backbone token, in the backbone's dtype
    fused_norms: bool = True  # BN->Linear, LN->qkv, attention out->proj keep only the norm's input
    mlp_recompute: Literal["none", "gelu", "fc1"] = "gelu"  # recompute in backward: nothing, GELU, fc1+GELU

    @property
    def num_heads(self) -> int:
        heads = self.heads if self.heads is not None else self.width // 64
        if heads < 1 or self.width % heads:
            raise ValueError(f"side width {self.width} cannot be split into {heads} attention heads")
        return heads

    def tap_layers(self, backbone_layers: int) -> list[int]:
        """Backbone block indices (0-based) after which the side network taps."""
        start = self.tap_every - 1
        return list(range(start, backbone_layers, self.tap_every))


@dataclass(frozen=True)
class ModelSpec:
    backbone: BackboneSpec
    side: SideSpec
    description: str = ""


_CLIP_SIDE = dict(tap_every=1, tap_order="norm_linear", block_norm="pre", post_bn=True,
                  pos_init_std=0.01, init="clip")
_EVA_SIDE = dict(tap_every=2, tap_order="linear_norm", block_norm="post", post_bn=False,
                 pos_init_std=0.02, init="default")

MODELS: dict[str, ModelSpec] = {
    "s4v_b32": ModelSpec(
        BackboneSpec("clip", "ViT-B-32-quickgelu", 224, 32, 768, 12, 12, 4.0, 512),
        SideSpec(320, **_CLIP_SIDE), "OpenAI CLIP ViT-B/32 + side width 320"),
    "s4v_b16": ModelSpec(
        BackboneSpec("clip", "ViT-B-16-quickgelu", 224, 16, 768, 12, 12, 4.0, 512),
        SideSpec(320, **_CLIP_SIDE), "OpenAI CLIP ViT-B/16 + side width 320"),
    "s4v_l14": ModelSpec(
        BackboneSpec("clip", "ViT-L-14-quickgelu", 224, 14, 1024, 24, 16, 4.0, 768),
        SideSpec(512, **_CLIP_SIDE), "OpenAI CLIP ViT-L/14 + side width 512"),
    "s4v_e14": ModelSpec(
        BackboneSpec("eva", "EVA02-E-14", 224, 14, 1792, 64, 16, 15360 / 1792, 1024),
        SideSpec(576, **_EVA_SIDE), "EVA02-CLIP-E/14 (4.4B) + side width 576 on odd layers"),
    # Random-init tiny towers of each family, for tests and the demo (64 side width -> 1 side head).
    "s4v_tiny": ModelSpec(
        BackboneSpec("clip", "ViT-B-16-quickgelu", 32, 8, 64, 2, 2, 4.0, 64),
        SideSpec(64, **_CLIP_SIDE), "tiny CLIP-family tower (random init) for tests and the demo"),
    "s4v_tiny_eva": ModelSpec(
        BackboneSpec("eva", "EVA02-E-14", 32, 8, 48, 4, 2, 15360 / 1792, 16),
        SideSpec(64, **_EVA_SIDE), "tiny EVA-family tower (random init) for tests"),
}


def closest(name: str, choices) -> str:
    """A ' did you mean ...?' hint for a misspelt name, or the list of valid names."""
    choices = list(choices)
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid: {', '.join(sorted(choices))}"


def apply_overrides(spec: ModelSpec, overrides: dict) -> ModelSpec:
    """Return `spec` with fields replaced. Keys are field names of BackboneSpec or SideSpec, optionally
    prefixed (`backbone.width`, `side.width`); an unprefixed name shared by both is ambiguous."""
    bb, side = {}, {}
    bb_fields = {f.name for f in dataclasses.fields(BackboneSpec)}
    side_fields = {f.name for f in dataclasses.fields(SideSpec)}
    aliases = {"side_width": "side.width", "side_heads": "side.heads", "backbone_heads": "backbone.heads"}
    for key, value in overrides.items():
        key = aliases.get(key, key)
        section, _, name = key.rpartition(".")
        if section == "backbone" or (not section and name in bb_fields - side_fields):
            target, fields_ = bb, bb_fields
        elif section == "side" or (not section and name in side_fields - bb_fields):
            target, fields_ = side, side_fields
        elif not section and name in bb_fields & side_fields:
            raise ValueError(f"model override {key!r} is ambiguous; write backbone.{name} or side.{name}")
        else:
            valid = [f"backbone.{n}" for n in bb_fields] + [f"side.{n}" for n in side_fields] + list(aliases)
            raise ValueError(f"unknown model override {key!r}" + closest(key, valid))
        if name not in fields_:
            raise ValueError(f"unknown model override {key!r}" + closest(key, [f"{section}.{n}" for n in fields_]))
        target[name] = value
    return ModelSpec(dataclasses.replace(spec.backbone, **bb), dataclasses.replace(spec.side, **side),
                     spec.description)


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}" + closest(name, MODELS))
    return MODELS[name]
