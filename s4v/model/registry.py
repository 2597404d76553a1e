"""Every named s4v model, recognition and retrieval, in one table of plain data.

Side networks follow the paper's rule (docs/method.md 2.1, 4, 10): a tap after every tower layer up
to 24 layers and after every other layer beyond (always ending at the last layer), and the side width
of the paper's nearest tower (B: 320, L: 512, E: 576). Retrieval models use side width 320 everywhere,
as the official retrieval scripts (docs/method.md 5.1). Tiny towers of every family (random init, the
family's real block type, norms, prefix tokens and position scheme at shrunken sizes) are entries of
the same table, for tests and demos.
"""
from __future__ import annotations

import dataclasses

from .specs import BackboneSpec, ModelSpec, SideSpec, TextSpec

_CLIP_SIDE = dict(tap_every=1, tap_order="norm_linear", block_norm="pre", post_bn=True,
                  pos_init_std=0.01, init="clip")
_EVA_SIDE = dict(tap_every=2, tap_order="linear_norm", block_norm="post", post_bn=False,
                 pos_init_std=0.02, init="default")


def _side(width: int, tap_every: int = 1) -> SideSpec:
    """The paper's CLIP-style side network (pre-norm blocks, LN->Linear taps) at `width`."""
    return SideSpec(width, **{**_CLIP_SIDE, "tap_every": tap_every})


def _retrieval(spec: ModelSpec, text: TextSpec, description: str, width: int = 320) -> ModelSpec:
    # Same side network as the recognition model of that tower, at the retrieval width, with the post
    # BN3d (the EVA retrieval path has it too, method 5.4) and a position embedding of N+1 rows that
    # also covers the CLS prompt (method 5.1).
    side = dataclasses.replace(spec.side, width=width, post_bn=True, cls_pos=True)
    return ModelSpec(spec.backbone, side, description, text)


_OPENAI_B32 = BackboneSpec("clip", "ViT-B-32-quickgelu", 224, 32, 768, 12, 12, 4.0, 512)
_OPENAI_B16 = BackboneSpec("clip", "ViT-B-16-quickgelu", 224, 16, 768, 12, 12, 4.0, 512)
_OPENAI_L14 = BackboneSpec("clip", "ViT-L-14-quickgelu", 224, 14, 1024, 24, 16, 4.0, 768)
_EVA_E14 = BackboneSpec("eva", "EVA02-E-14", 224, 14, 1792, 64, 16, 15360 / 1792, 1024)

RECOGNITION: dict[str, ModelSpec] = {
    # The paper's towers (official parameter counts, docs/method.md 2.1).
    "s4v_b32": ModelSpec(_OPENAI_B32, _side(320), "OpenAI CLIP ViT-B/32 + side width 320"),
    "s4v_b16": ModelSpec(_OPENAI_B16, _side(320), "OpenAI CLIP ViT-B/16 + side width 320"),
    "s4v_l14": ModelSpec(_OPENAI_L14, _side(512), "OpenAI CLIP ViT-L/14 + side width 512"),
    "s4v_e14": ModelSpec(_EVA_E14, SideSpec(576, **_EVA_SIDE),
                         "EVA02-CLIP-E/14 (4.4B) + side width 576 on odd layers"),
    # Later towers (docs/method.md 10).
    "s4v_l14_336": ModelSpec(
        BackboneSpec("clip", "ViT-L-14-336-quickgelu", 336, 14, 1024, 24, 16, 4.0, 768),
        _side(512), "OpenAI CLIP ViT-L/14 at 336px + side width 512"),
    "s4v_eva02_l14": ModelSpec(
        BackboneSpec("eva", "EVA02-L-14", 224, 14, 1024, 24, 16, 4 * 2 / 3, 768),
        _side(512), "EVA02-CLIP-L/14 (RoPE, SwiGLU) + side width 512"),
    "s4v_pe_b16": ModelSpec(
        BackboneSpec("pe", "PE-Core-B-16", 224, 16, 768, 12, 12, 4.0, 1024),
        _side(320), "PE-Core B/16 + side width 320"),
    "s4v_pe_l14_336": ModelSpec(
        BackboneSpec("pe", "PE-Core-L-14-336", 336, 14, 1024, 24, 16, 4.0, 1024),
        _side(512), "PE-Core L/14 at 336px + side width 512"),
    "s4v_pe_g14_448": ModelSpec(
        BackboneSpec("pe", "PE-Core-bigG-14-448", 448, 14, 1536, 50, 16, 8960 / 1536, 1280, class_token=False),
        _side(576, tap_every=2), "PE-Core G/14 at 448px (no CLS) + side width 576 on every other layer"),
    "s4v_siglip2_b16": ModelSpec(
        BackboneSpec("siglip2", "ViT-B-16-SigLIP2", 224, 16, 768, 12, 12, 4.0, 768, class_token=False),
        _side(320), "SigLIP2 B/16 (no CLS) + side width 320"),
    "s4v_siglip2_so400m14": ModelSpec(
        BackboneSpec("siglip2", "ViT-SO400M-14-SigLIP2", 224, 14, 1152, 27, 16, 3.7362, 1152, class_token=False),
        _side(512, tap_every=2), "SigLIP2 So400m/14 (no CLS) + side width 512 on every other layer"),
    "s4v_dinov2_l14": ModelSpec(
        BackboneSpec("dinov2", "", 224, 14, 1024, 24, 16, 4.0, 1024, timm_name="vit_large_patch14_dinov2"),
        _side(512), "DINOv2 ViT-L/14 at 224px + side width 512"),
    "s4v_dinov3_l16": ModelSpec(
        BackboneSpec("dinov3", "", 224, 16, 1024, 24, 16, 4.0, 1024, timm_name="vit_large_patch16_dinov3",
                     reg_tokens=4),
        _side(512), "DINOv3 ViT-L/16 (4 registers, RoPE) + side width 512"),
    # Random-init tiny towers of each family, for tests and the demo (64 side width -> 1 side head).
    "s4v_tiny": ModelSpec(
        BackboneSpec("clip", "ViT-B-16-quickgelu", 32, 8, 64, 2, 2, 4.0, 64),
        SideSpec(64, **_CLIP_SIDE), "tiny CLIP-family tower (random init) for tests and the demo"),
    "s4v_tiny_eva": ModelSpec(
        BackboneSpec("eva", "EVA02-E-14", 32, 8, 48, 4, 2, 15360 / 1792, 16),
        SideSpec(64, **_EVA_SIDE), "tiny EVA-family tower (random init) for tests"),
    "s4v_tiny_eva02": ModelSpec(
        BackboneSpec("eva", "EVA02-L-14", 32, 8, 64, 2, 2, 4 * 2 / 3, 48),
        _side(64), "tiny EVA02-L-family tower (RoPE, SwiGLU; random init) for tests"),
    "s4v_tiny_pe": ModelSpec(
        BackboneSpec("pe", "PE-Core-B-16", 32, 8, 64, 2, 2, 4.0, 48),
        _side(64), "tiny PE-Core-family tower (RoPE, CLS; random init) for tests"),
    "s4v_tiny_pe_nocls": ModelSpec(
        BackboneSpec("pe", "PE-Core-bigG-14-448", 32, 8, 64, 3, 2, 8960 / 1536, 48, class_token=False),
        _side(64, tap_every=2), "tiny PE-Core-G-family tower (no CLS, odd depth, every other layer) for tests"),
    "s4v_tiny_siglip2": ModelSpec(
        BackboneSpec("siglip2", "ViT-B-16-SigLIP2", 32, 8, 64, 3, 2, 4.0, 64, class_token=False),
        _side(64, tap_every=2), "tiny SigLIP2-family tower (no CLS, attention pooling) for tests"),
    "s4v_tiny_dinov2": ModelSpec(
        BackboneSpec("dinov2", "", 32, 8, 64, 2, 2, 4.0, 64, timm_name="vit_large_patch14_dinov2"),
        _side(64), "tiny DINOv2-family tower (layer scale; random init) for tests"),
    "s4v_tiny_dinov3": ModelSpec(
        BackboneSpec("dinov3", "", 32, 8, 64, 2, 2, 4.0, 64, timm_name="vit_large_patch16_dinov3", reg_tokens=4),
        _side(64), "tiny DINOv3-family tower (4 registers, RoPE; random init) for tests"),
}

_R = RECOGNITION
_PE_TEXT = TextSpec(1024, 16, 24, context_length=32, quick_gelu=False)
RETRIEVAL: dict[str, ModelSpec] = {
    "s4v_retrieval_b32": _retrieval(_R["s4v_b32"], TextSpec(512, 8, 12),
                                    "retrieval: OpenAI CLIP ViT-B/32 + side width 320, CLIP text tower, WTI"),
    "s4v_retrieval_b16": _retrieval(_R["s4v_b16"], TextSpec(512, 8, 12),
                                    "retrieval: OpenAI CLIP ViT-B/16 + side width 320, CLIP text tower, WTI"),
    "s4v_retrieval_l14": _retrieval(_R["s4v_l14"], TextSpec(768, 12, 12),
                                    "retrieval: OpenAI CLIP ViT-L/14 + side width 320, CLIP text tower, WTI"),
    "s4v_retrieval_e14": _retrieval(
        _R["s4v_e14"], TextSpec(1024, 16, 24, quick_gelu=False),
        "retrieval: EVA02-CLIP-E/14 + side width 320 on odd layers, EVA02-CLIP text tower, WTI"),
    "s4v_retrieval_eva02_l14": _retrieval(
        _R["s4v_eva02_l14"], TextSpec(768, 12, 12, quick_gelu=False),
        "retrieval: EVA02-CLIP-L/14 + side width 320, EVA02-CLIP text tower, WTI"),
    "s4v_retrieval_pe_b16": _retrieval(_R["s4v_pe_b16"], _PE_TEXT,
                                       "retrieval: PE-Core B/16 + side width 320, PE text tower, WTI"),
    "s4v_retrieval_pe_l14_336": _retrieval(_R["s4v_pe_l14_336"], _PE_TEXT,
                                           "retrieval: PE-Core L/14-336 + side width 320, PE text tower, WTI"),
    "s4v_retrieval_pe_g14_448": _retrieval(
        _R["s4v_pe_g14_448"], TextSpec(1280, 20, 24, context_length=72, quick_gelu=False),
        "retrieval: PE-Core G/14-448 + side width 320 on every other layer, PE text tower, WTI"),
    "s4v_retrieval_siglip2_b16": _retrieval(
        _R["s4v_siglip2_b16"], TextSpec(768, 12, 12, context_length=64, vocab_size=256000, quick_gelu=False),
        "retrieval: SigLIP2 B/16 + side width 320, SigLIP2 text tower (Gemma tokenizer), WTI"),
    "s4v_retrieval_siglip2_so400m14": _retrieval(
        _R["s4v_siglip2_so400m14"],
        TextSpec(1152, 16, 27, context_length=64, vocab_size=256000, mlp_ratio=3.7362, quick_gelu=False),
        "retrieval: SigLIP2 So400m/14 + side width 320 on every other layer, SigLIP2 text tower, WTI"),
    # Random-init tiny towers for tests and demos.
    "s4v_retrieval_tiny": _retrieval(_R["s4v_tiny"], TextSpec(64, 2, 2),
                                     "retrieval: tiny CLIP-family towers (random init) for tests", 64),
    "s4v_retrieval_tiny_eva": _retrieval(_R["s4v_tiny_eva"], TextSpec(64, 2, 2, quick_gelu=False),
                                         "retrieval: tiny EVA-family towers (random init) for tests", 64),
    "s4v_retrieval_tiny_eva02": _retrieval(_R["s4v_tiny_eva02"], TextSpec(64, 2, 2, quick_gelu=False),
                                           "retrieval: tiny EVA02-L-family towers (random init) for tests", 64),
    "s4v_retrieval_tiny_pe": _retrieval(_R["s4v_tiny_pe"], TextSpec(64, 2, 2, context_length=32, quick_gelu=False),
                                        "retrieval: tiny PE-Core-family towers (random init) for tests", 64),
    "s4v_retrieval_tiny_pe_nocls": _retrieval(
        _R["s4v_tiny_pe_nocls"], TextSpec(64, 2, 2, context_length=32, quick_gelu=False),
        "retrieval: tiny PE-Core-G-family towers (no CLS; random init) for tests", 64),
    "s4v_retrieval_tiny_siglip2": _retrieval(
        _R["s4v_tiny_siglip2"], TextSpec(64, 2, 2, context_length=64, vocab_size=1000, quick_gelu=False),
        "retrieval: tiny SigLIP2-family towers (no CLS; random init) for tests", 64),
}

MODELS: dict[str, ModelSpec] = {**RECOGNITION, **RETRIEVAL}
