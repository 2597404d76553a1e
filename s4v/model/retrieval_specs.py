"""Named text-video retrieval models (spec section 5), as plain data (no torch import).

A retrieval model is a frozen image tower + side network (as in recognition, but 12 frames and side
width 320 everywhere, spec 5.1/5.4) plus the CLIP text tower of the same checkpoint (spec 5.2).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .specs import MODELS, BackboneSpec, ModelSpec, SideSpec, apply_overrides, closest


@dataclass(frozen=True)
class TextSpec:
    """The CLIP text transformer (open_clip `TextTransformer`): OpenAI layout, causal, projected."""

    width: int = 512
    heads: int = 8
    layers: int = 12
    context_length: int = 77  # rows of the positional embedding in the checkpoint (max_words <= this)
    vocab_size: int = 49408  # the CLIP BPE vocabulary (open_clip's SimpleTokenizer)
    mlp_ratio: float = 4.0
    quick_gelu: bool = True  # OpenAI CLIP: QuickGELU; EVA02-CLIP text towers: exact GELU


@dataclass(frozen=True)
class RetrievalSpec:
    backbone: BackboneSpec
    side: SideSpec
    text: TextSpec
    description: str = ""

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim


def _side(base: str, width: int = 320) -> SideSpec:
    # Same side network as the recognition model of that backbone family (taps, norms, post BN3d),
    # at the retrieval width. The EVA retrieval path has the post BN3d (spec 5.4); the position embedding
    # has N+1 rows and also covers the CLS prompt (spec 5.1).
    return dataclasses.replace(MODELS[base].side, width=width, post_bn=True, cls_pos=True)


RETRIEVAL_MODELS: dict[str, RetrievalSpec] = {
    "s4v_retrieval_b32": RetrievalSpec(
        MODELS["s4v_b32"].backbone, _side("s4v_b32"), TextSpec(512, 8, 12),
        "retrieval: OpenAI CLIP ViT-B/32 + side width 320, CLIP text tower, WTI"),
    "s4v_retrieval_b16": RetrievalSpec(
        MODELS["s4v_b16"].backbone, _side("s4v_b16"), TextSpec(512, 8, 12),
        "retrieval: OpenAI CLIP ViT-B/16 + side width 320, CLIP text tower, WTI"),
    "s4v_retrieval_l14": RetrievalSpec(
        MODELS["s4v_l14"].backbone, _side("s4v_l14"), TextSpec(768, 12, 12),
        "retrieval: OpenAI CLIP ViT-L/14 + side width 320, CLIP text tower, WTI"),
    "s4v_retrieval_e14": RetrievalSpec(
        MODELS["s4v_e14"].backbone, _side("s4v_e14"), TextSpec(1024, 16, 24, quick_gelu=False),
        "retrieval: EVA02-CLIP-E/14 + side width 320 on odd layers, EVA02-CLIP text tower, WTI"),
    # Random-init tiny towers for tests and demos (real CLIP tokenizer and vocabulary).
    "s4v_retrieval_tiny": RetrievalSpec(
        MODELS["s4v_tiny"].backbone, _side("s4v_tiny", 64), TextSpec(64, 2, 2),
        "retrieval: tiny CLIP-family towers (random init) for tests"),
    "s4v_retrieval_tiny_eva": RetrievalSpec(
        MODELS["s4v_tiny_eva"].backbone, _side("s4v_tiny_eva", 64), TextSpec(64, 2, 2, quick_gelu=False),
        "retrieval: tiny EVA-family towers (random init) for tests"),
}


def get_retrieval_spec(name: str) -> RetrievalSpec:
    if name not in RETRIEVAL_MODELS:
        raise ValueError(f"unknown retrieval model {name!r}" + closest(name, RETRIEVAL_MODELS))
    return RETRIEVAL_MODELS[name]


def apply_retrieval_overrides(spec: RetrievalSpec, overrides: dict) -> RetrievalSpec:
    """`text.<field>` keys change the text tower; everything else is a backbone/side field as in
    `specs.apply_overrides`."""
    text, rest = {}, {}
    text_fields = {f.name for f in dataclasses.fields(TextSpec)}
    for key, value in overrides.items():
        if key.startswith("text."):
            name = key[len("text."):]
            if name not in text_fields:
                raise ValueError(f"unknown model override {key!r}" + closest(key, [f"text.{n}" for n in text_fields]))
            text[name] = value
        else:
            rest[key] = value
    base = apply_overrides(ModelSpec(spec.backbone, spec.side, spec.description), rest) if rest else spec
    return RetrievalSpec(base.backbone, base.side, dataclasses.replace(spec.text, **text), spec.description)
