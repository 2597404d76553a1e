"""What an s4v model is made of, as plain data: the frozen tower, the side network and, for retrieval,
the text tower. The table of named models is `s4v.model.registry.MODELS`.

Sizes and switches follow docs/method.md (sections 2.1, 4 and 5).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Literal, Optional

# Tower families (s4v/model/towers.py says how each one is built, tapped and loaded).
Family = Literal["clip", "eva", "pe", "siglip2", "dinov2", "dinov3"]


@dataclass(frozen=True)
class BackboneSpec:
    """A frozen image tower. `open_clip_name` picks open_clip's config (and, for timm-built towers, the
    timm model in it); `timm_name` names a timm model directly (towers open_clip lacks, e.g. DINOv2).
    The size fields override the library's defaults, so a shrunken tower keeps the family's block type,
    norms, prefix tokens and position scheme."""

    family: Family  # clip: OpenAI CLIP ViT; eva: EVA02-CLIP; pe: PE-Core; siglip2; dinov2; dinov3
    open_clip_name: str  # e.g. "ViT-B-16-quickgelu", "EVA02-E-14", "PE-Core-L-14-336"; "" for timm-only towers
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512  # output embedding width (the retrieval head's; unused by recognition)
    keep_head: bool = False  # keep the final norm/pool/projection; recognition never runs them
    timm_name: str = ""  # timm model name; "" = the one in open_clip's config
    class_token: bool = True  # the tower has a CLS token (SigLIP2 and PE-Core-G/14 have none)
    reg_tokens: int = 0  # register tokens after the CLS (DINOv3: 4); never given to the side network

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens


@dataclass(frozen=True)
class SideSpec:
    """The trainable spatial-temporal side network (docs/method.md sections 2.3, 4)."""

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
    cls_pos: bool = False  # the position embedding also covers the CLS prompt (N+1 rows; retrieval, method 5.1)
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
        """Backbone block indices (0-based) after which the side network taps: every `tap_every`-th
        layer, counted back from the last one (EVA-E: 1, 3, ..., 63; a 27-layer tower: 0, 2, ..., 26)."""
        return sorted(range(backbone_layers - 1, -1, -self.tap_every))


@dataclass(frozen=True)
class TextSpec:
    """The text transformer (open_clip `TextTransformer`) of a retrieval model. Sizes only: the rest
    (causal mask, pooling, projection bias, norm eps, activation, tokenizer) comes from the open_clip
    config of the backbone's `open_clip_name`."""

    width: int = 512
    heads: int = 8
    layers: int = 12
    context_length: int = 77  # rows of the positional embedding in the checkpoint (max_words <= this)
    vocab_size: int = 49408  # the CLIP BPE vocabulary (open_clip's SimpleTokenizer); SigLIP2: 256000 (Gemma)
    mlp_ratio: float = 4.0
    quick_gelu: bool = True  # OpenAI CLIP: QuickGELU; EVA02-CLIP, PE-Core, SigLIP2: exact (or tanh) GELU


@dataclass(frozen=True)
class ModelSpec:
    """A recognition model (`text` None) or a text-video retrieval model (with its text tower)."""

    backbone: BackboneSpec
    side: SideSpec
    description: str = ""
    text: Optional[TextSpec] = None

    @property
    def task(self) -> str:
        return "recognition" if self.text is None else "retrieval"

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim


RetrievalSpec = ModelSpec  # the retrieval models' spec is the same type, with `text` set


def spec_to_dict(spec: ModelSpec) -> dict:
    """Plain data (for model files); `spec_from_dict` reads it back, also from files written before
    `text` and the newer backbone fields existed."""
    return dataclasses.asdict(spec)


def spec_from_dict(d: dict) -> ModelSpec:
    text = d.get("text")
    return ModelSpec(BackboneSpec(**d["backbone"]), SideSpec(**d["side"]), d.get("description", ""),
                     TextSpec(**text) if text else None)


def closest(name: str, choices) -> str:
    """A ' did you mean ...?' hint for a misspelt name, or the list of valid names."""
    choices = list(choices)
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid: {', '.join(sorted(choices))}"


_ALIASES = {"side_width": "side.width", "side_heads": "side.heads", "backbone_heads": "backbone.heads"}


def apply_overrides(spec: ModelSpec, overrides: dict) -> ModelSpec:
    """Return `spec` with fields replaced. Keys are field names of BackboneSpec or SideSpec, optionally
    prefixed (`backbone.width`, `side.width`), or `text.<field>` for a retrieval model; an unprefixed
    name shared by backbone and side is ambiguous."""
    parts: dict[str, dict] = {"backbone": {}, "side": {}, "text": {}}
    fields = {"backbone": {f.name for f in dataclasses.fields(BackboneSpec)},
              "side": {f.name for f in dataclasses.fields(SideSpec)},
              "text": {f.name for f in dataclasses.fields(TextSpec)} if spec.text is not None else set()}
    for key, value in overrides.items():
        key = _ALIASES.get(key, key)
        section, _, name = key.rpartition(".")
        if not section:
            owners = [s for s in ("backbone", "side") if name in fields[s]]
            if len(owners) > 1:
                raise ValueError(f"model override {key!r} is ambiguous; write backbone.{name} or side.{name}")
            section = owners[0] if owners else ""
        if section not in fields or name not in fields[section]:
            valid = [f"{s}.{n}" for s in fields for n in fields[s]] + list(_ALIASES)
            raise ValueError(f"unknown model override {key!r}" + closest(key, valid))
        parts[section][name] = value
    text = dataclasses.replace(spec.text, **parts["text"]) if spec.text is not None else None
    return ModelSpec(dataclasses.replace(spec.backbone, **parts["backbone"]),
                     dataclasses.replace(spec.side, **parts["side"]), spec.description, text)


def get_spec(name: str) -> ModelSpec:
    from .registry import MODELS

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}" + closest(name, MODELS))
    return MODELS[name]


def __getattr__(name: str):
    if name == "MODELS":  # `s4v.model.specs.MODELS`, kept for callers of the old layout
        from .registry import MODELS

        return MODELS
    raise AttributeError(name)
