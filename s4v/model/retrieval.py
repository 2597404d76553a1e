"""Side4Video text-video retrieval model (docs/method.md 5): frozen image tower + side network as the
video encoder, the text tower of the same checkpoint as the text encoder, WTI (or mean) similarity,
learned temperature.

Video encoder, per frame (docs/method.md 5.1, 5.4):

    s = SideNetwork(video, taps)                                 # [B*T, N, D]
    p = mean_N(BN3d(s)) @ side_proj                              # [B*T, W], side_proj zero-initialised
    e = proj(ln_post(CLS_L + p))                                 # [B, T, E]  (EVA: head(norm(...)))

`CLS_L` is the frozen tower's last-layer CLS token; `ln_post`/`proj` are the tower's own final norm
and projection, loaded from the same checkpoint. Because `side_proj` starts at zero, a fresh model's
frame embeddings are exactly frozen CLIP's per-frame image embeddings. Towers that pool by attention
(SigLIP2, PE-Core; docs/method.md 10.3) get `p` added to every last-layer token their own norm ->
attention pool -> projection reads, with the same zero-init property.

Text encoder (docs/method.md 5.2): the CLIP text transformer returning every token, `ln_final`, then
`text_projection`: `[B, L, E]` for `L = max_words` tokens (SOT, words, EOT, zero padding).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from s4v.fileio import atomic_torch_save

from .backbone import FrozenBackbone, assign_state_dict, load_tower_weights, materialize, read_state_dict, \
    resolve_dtype, tower_state_dict
from .layers import LayerNormFp32, TokenBatchNorm
from .side_net import SideNetwork
from .specs import ModelSpec, TextSpec, spec_from_dict, spec_to_dict
from .towers import MapHead, family_info
from .wti import Interaction, TextEmbedding, TokenInteraction, VideoEmbedding, token_wise_score

FORMAT = "s4v-retrieval-model"
VERSION = 1
DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature (a pretrained file brings its own)


# ------------------------------------------------------------------------------------------ text
@functools.lru_cache(maxsize=4)
def _tokenizer(max_words: int, hf_name: str = ""):
    if not hf_name:
        from open_clip.tokenizer import SimpleTokenizer  # BPE vocabulary ships inside open_clip (offline)

        return SimpleTokenizer(context_length=max_words)
    from open_clip.tokenizer import HFTokenizer

    try:  # SigLIP2's Gemma tokenizer: needs `transformers` and the tokenizer files in the local HF cache
        return HFTokenizer(hf_name, context_length=max_words, clean="canonicalize")
    except Exception as err:  # noqa: BLE001 - ImportError, or huggingface_hub's offline/cache errors
        raise ValueError(f"tokenizer {hf_name!r} is not available offline ({type(err).__name__}: {err}); it needs "
                         "the `transformers` package and the tokenizer in the local Hugging Face cache") from err


def tokenize(texts: Sequence[str], max_words: int = 32, tokenizer: str = "") -> torch.Tensor:
    """Token ids `[N, max_words]`. Default: CLIP BPE (SOT, words, EOT, zero padding; a long caption is
    cut and ends with EOT); `tokenizer`: a Hugging Face tokenizer name (`text_config(spec)` gives a
    model's, e.g. SigLIP2's Gemma tokenizer), padding id 0."""
    return _tokenizer(max_words, tokenizer)(list(texts))


def tokenize_for(spec, texts: Sequence[str], max_words: int = 32) -> torch.Tensor:
    """`tokenize` with the tokenizer of the model `spec` describes (CLIP BPE, or e.g. SigLIP2's Gemma)."""
    name = spec.backbone.open_clip_name
    return tokenize(texts, max_words, text_config(name).get("hf_tokenizer_name", "") if name else "")


_TEXT_STYLE_KEYS = ("no_causal_mask", "proj_bias", "pool_type", "norm_kwargs", "act_kwargs")


def text_config(open_clip_name: str) -> dict:
    """What the open_clip config of a tower says about its text tower beyond the sizes: causal mask,
    pooling, projection bias, norm eps, activation and `hf_tokenizer_name` (e.g. SigLIP2)."""
    import open_clip

    cfg = (open_clip.get_model_config(open_clip_name) or {}).get("text_cfg", {})
    return {k: v for k, v in cfg.items() if k in (*_TEXT_STYLE_KEYS, "hf_tokenizer_name")}


def build_text_tower(spec: TextSpec, embed_dim: int, open_clip_name: str = "") -> nn.Module:
    from open_clip.model import _build_text_tower

    style = {k: v for k, v in text_config(open_clip_name).items() if k in _TEXT_STYLE_KEYS} if open_clip_name else {}
    cfg = dict(context_length=spec.context_length, vocab_size=spec.vocab_size, width=spec.width,
               heads=spec.heads, layers=spec.layers, mlp_ratio=spec.mlp_ratio, **style)
    return _build_text_tower(embed_dim, cfg, quick_gelu=spec.quick_gelu)


# ------------------------------------------------------------------------------------- video head
class RetrievalVideoHead(nn.Module):
    """BN3d over the side tokens, spatial mean per frame, zero-initialised projection D -> W."""

    def __init__(self, dim: int, backbone_width: int, post_bn: bool = True):
        super().__init__()
        self.bn = TokenBatchNorm(dim) if post_bn else None
        self.side_proj = nn.Parameter(torch.empty(dim, backbone_width))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.side_proj)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """`[B*T, N, D]` -> `[B*T, W]`."""
        if self.bn is not None:
            s = self.bn(s)
        return s.mean(dim=1) @ self.side_proj.to(s.dtype)


class VisualProjection(nn.Module):
    """The tower's final norm and projection, applied to the per-frame CLS (+ side) token.
    CLIP: `ln_post` then `x @ proj`; EVA: `norm` then `head` (Linear with bias)."""

    def __init__(self, family: str, width: int, embed_dim: int):
        super().__init__()
        self.family = family
        self.norm = LayerNormFp32(width, eps=1e-5 if family == "clip" else 1e-6)
        if family == "clip":
            self.proj = nn.Parameter(torch.empty(width, embed_dim))
            self.head = None
        else:
            self.proj = None
            self.head = nn.Linear(width, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.proj is not None:
            nn.init.normal_(self.proj, std=self.proj.shape[0] ** -0.5)  # open_clip's init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.proj is not None:
            return x @ self.proj.to(x.dtype)
        return self.head(x.to(self.head.weight.dtype))

    def embed(self, global_token: torch.Tensor, patches: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """Frame embeddings `[B, E]`: the last layer's CLS `[B, 1, W]` plus the side feature `[B, W]`."""
        return self(global_token[:, 0].to(side.dtype) + side)

    def checkpoint_keys(self) -> dict[str, str]:
        """Our key -> the tower's key (after `tower_state_dict`)."""
        return self.checkpoint_keys_of(self.family)

    @staticmethod
    def checkpoint_keys_of(family: str) -> dict[str, str]:
        if family == "clip":
            return {"norm.weight": "ln_post.weight", "norm.bias": "ln_post.bias", "proj": "proj"}
        return {"norm.weight": "norm.weight", "norm.bias": "norm.bias", "head.weight": "head.weight",
                "head.bias": "head.bias"}


class Temperature(nn.Module):
    """Learned logit scale `exp(logit_scale)`, capped at `max_scale` (100, as CLIP and the official code)."""

    def __init__(self, init: float = DEFAULT_LOGIT_SCALE, max_scale: float = 100.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full((1,), float(init)))  # 1-d: ZeRO cannot flatten 0-d tensors
        self.max_scale = max_scale
        self.init_value = init

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.logit_scale.fill_(self.init_value)

    def forward(self) -> torch.Tensor:
        # Clamped where used (and not only after the step), so a bf16/ZeRO master copy cannot escape the cap.
        return self.logit_scale.float().clamp(max=math.log(self.max_scale)).exp().squeeze(0)


def retrieval_side_init_(side: SideNetwork) -> None:
    """The retrieval code's initialisation (docs/method.md 5.1): CLIP4Clip re-initialises every new Linear to
    N(0, 0.02) with zero bias (our taps, pointwise convs, MLPs and attention output projections); the
    attention input projection keeps its N(0, D^-1/2) (it is a raw `in_proj_weight` parameter there);
    the depthwise temporal conv gets N(0, D^-1/2)."""
    dim = side.spec.width
    with torch.no_grad():
        for blk in side.blocks:
            for lin in (blk.temporal.pw1, blk.temporal.pw2, blk.mlp.fc1, blk.mlp.fc2, blk.attn.proj):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            nn.init.normal_(blk.attn.qkv.weight, std=dim ** -0.5)
            nn.init.zeros_(blk.attn.qkv.bias)
            nn.init.normal_(blk.temporal.dw.weight, std=dim ** -0.5)
            nn.init.zeros_(blk.temporal.dw.bias)
        for tap in side.taps:
            nn.init.normal_(tap.proj.weight, std=0.02)
            nn.init.zeros_(tap.proj.bias)


# ------------------------------------------------------------------------------------------ model
class Side4VideoRetrieval(nn.Module):
    """`forward(video, text_ids)` -> `[B_text, B_video]` similarity logits (scaled by the temperature).

    `video` `[B, T, 3, H, W]` normalised with CLIP mean/std; `text_ids` `[A, L]` from `tokenize`.
    Encoders: `encode_video(video)` -> per-frame embeddings `[B, T, E]`; `encode_text(ids)` -> token
    features `[A, L, E]`. Only `trainable_modules()` hold trainable parameters; the image tower is frozen.
    """

    def __init__(self, spec: ModelSpec, num_frames: int = 12, interaction: Interaction = "wti",
                 name: str = "custom", freeze_text: bool = False):
        super().__init__()
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 (got {num_frames})")
        if spec.text is None:
            raise ValueError(f"{name} is a recognition model: a retrieval model needs a text tower")
        self.name, self.spec, self.num_frames = name, spec, num_frames
        bb = spec.backbone
        head = family_info(bb.family).head
        if head == "none" or bb.reg_tokens:
            raise ValueError(f"{bb.family} towers have no text tower / embedding head for retrieval")
        taps = spec.side.tap_layers(bb.layers)
        if taps[-1] != bb.layers - 1:
            raise ValueError(f"retrieval needs a tap after the last backbone layer (taps {taps}, {bb.layers} layers)")
        self.backbone = FrozenBackbone(dataclasses.replace(bb, keep_head=head == "map"), taps)
        self.side = SideNetwork(spec.side, bb.width, bb.patch_size, bb.num_patches, len(taps))
        self.video_head = RetrievalVideoHead(spec.side.width, bb.width, spec.side.post_bn)
        if head == "map":  # the tower's own norm -> attention pool -> projection, taken out of it
            self.visual_proj = MapHead(self.backbone.tower, bb.class_token)
            self.backbone.tower.prune_intermediate_layers(taps, prune_norm=True, prune_head=True)
        else:
            self.visual_proj = VisualProjection(bb.family, bb.width, bb.embed_dim)
        self.text = build_text_tower(spec.text, bb.embed_dim, bb.open_clip_name)
        self.interaction = TokenInteraction(bb.embed_dim, interaction)
        self.temperature = Temperature()
        self.reset_new_parameters()
        self.set_text_trainable(not freeze_text)

    # ---------------------------------------------------------------------------------- parameters
    def reset_new_parameters(self) -> None:
        """Initialise what no checkpoint provides: side network, video head, interaction heads."""
        retrieval_side_init_(self.side)
        self.video_head.reset_parameters()
        self.interaction.reset_parameters()

    def set_text_trainable(self, trainable: bool) -> None:
        self.freeze_text = not trainable
        self.text.requires_grad_(trainable)

    def trainable_modules(self) -> nn.ModuleDict:
        """What an optimizer (DeepSpeed engine) owns. Side-rate parts: side, video_head, interaction;
        CLIP-rate parts (docs/method.md 5.2, lr x coef 1e-3): visual_proj, temperature and the text tower
        unless frozen."""
        parts = {"side": self.side, "video_head": self.video_head, "interaction": self.interaction,
                 "visual_proj": self.visual_proj, "temperature": self.temperature}
        if not self.freeze_text:
            parts["text"] = self.text
        return nn.ModuleDict(parts)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return self.trainable_modules().parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.side.grad_checkpointing = enable
        self.text.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------------------------ encoders
    def check_input(self, video: torch.Tensor) -> None:
        size = self.spec.backbone.image_size
        if video.dim() != 5 or video.shape[2] != 3 or tuple(video.shape[-2:]) != (size, size):
            raise ValueError(f"{self.name} expects video [B, T, 3, {size}, {size}], got {tuple(video.shape)}")

    def encode_video(self, video: torch.Tensor, taps=None) -> torch.Tensor:
        """Per-frame embeddings `[B, T, E]` (before L2 normalisation). `taps`: the frozen tower's output
        for `video` if already computed (the training loop runs the tower outside DeepSpeed)."""
        return video_embeddings(self.side, self.video_head, self.visual_proj, video,
                                taps if taps is not None else self.backbone(video.flatten(0, 1)))

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features `[A, L, E]` (projected, before normalisation) and the token mask `[A, L]`."""
        return text_token_features(self.text, ids)

    def prepare_video(self, frames: torch.Tensor) -> VideoEmbedding:
        return self.interaction.prepare_video(frames)

    def prepare_text(self, tokens: torch.Tensor, ids: torch.Tensor) -> TextEmbedding:
        return self.interaction.prepare_ids(tokens, ids)

    def forward(self, video: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Scaled similarity logits `[A, B]` of texts `ids` against `video`."""
        self.check_input(video)
        v = self.prepare_video(self.encode_video(video))
        tokens, _ = self.encode_text(ids)
        t = self.prepare_text(tokens, ids)
        return self.temperature() * token_wise_score(t, v)


def video_embeddings(side: SideNetwork, head: RetrievalVideoHead, visual_proj: nn.Module,
                     video: torch.Tensor, taps) -> torch.Tensor:
    """Module-level so that a DeepSpeed-owned wrapper can run it on its own submodules."""
    b, t = video.shape[:2]
    s = side(video, taps)
    global_token, patches = taps[-1]  # last layer's raw block outputs [B*T, 1, W], [B*T, N, W]
    return visual_proj.embed(global_token, patches, head(s)).view(b, t, -1)


def text_token_features(text: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All tokens of the open_clip `TextTransformer`: embed, causal transformer, ln_final, projection."""
    length = ids.shape[1]
    if length > text.positional_embedding.shape[0]:
        raise ValueError(f"{length} tokens exceed the text tower's context of {text.positional_embedding.shape[0]}")
    cast = text.transformer.get_cast_dtype()
    x = text.token_embedding(ids).to(cast) + text.positional_embedding[:length].to(cast)
    mask = text.attn_mask[:length, :length] if text.attn_mask is not None else None
    x = text.transformer(x, attn_mask=mask.to(x.dtype) if mask is not None else None)
    x = text.ln_final(x)
    proj = text.text_projection
    x = proj(x) if isinstance(proj, nn.Linear) else x @ proj.to(x.dtype)
    return x, ids != 0


# ---------------------------------------------------------------------------------- weights files
_NOT_TEXT = ("visual.", "logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size")


def text_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower's weights named as open_clip's `TextTransformer`: `text.*` (open_clip custom-text
    models such as EVA02) or the OpenAI top-level layout (token_embedding, positional_embedding,
    transformer.*, ln_final, text_projection)."""
    if any(k.startswith("text.") for k in sd):
        return {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    return {k: v for k, v in sd.items() if not k.startswith(_NOT_TEXT) and "side_" not in k}


def load_clip_weights(model: Side4VideoRetrieval, path: str | os.PathLike) -> None:
    """Both towers (and the temperature) from one open_clip / OpenAI checkpoint file."""
    sd = read_state_dict(path)
    tower = tower_state_dict(sd)
    model.backbone.load_state(tower, str(path))
    keys = model.visual_proj.checkpoint_keys()
    missing = [src for src in keys.values() if src not in tower]
    if missing:
        raise ValueError(f"{path} has no image-tower head ({', '.join(missing)}); retrieval needs the tower's "
                         "final norm and projection (a full CLIP checkpoint)")
    assign_state_dict(model.visual_proj, {ours: tower[src] for ours, src in keys.items()}, source=str(path))
    load_tower_weights(model.text, text_state_dict(sd), source=str(path), what="text tower")
    if "logit_scale" in sd:
        model.temperature.init_value = float(sd["logit_scale"].float())
    model.set_text_trainable(not model.freeze_text)


def _real_causal_mask(text: nn.Module) -> None:
    """The text tower's non-persistent causal mask, made for real on a meta-built model (no checkpoint
    holds it, so loading by assignment would leave it on `meta`)."""
    if text.attn_mask is not None and text.attn_mask.is_meta:
        with torch.device("cpu"):
            text.attn_mask = text.build_causal_mask()


def build_retrieval_model(spec: ModelSpec, num_frames: int = 12, name: str = "custom",
                          pretrained: Optional[str | os.PathLike] = None, device=None, backbone_dtype=None,
                          interaction: Interaction = "wti", freeze_text: bool = False,
                          max_temperature: float = 100.0) -> Side4VideoRetrieval:
    from .pretrained import resolve_pretrained

    if pretrained is not None:
        pretrained = resolve_pretrained(spec.backbone, pretrained)
    device = torch.device(device if device is not None else "cpu")
    build_on = torch.device("meta") if (pretrained is not None or device.type == "meta") else device
    with build_on:
        model = Side4VideoRetrieval(spec, num_frames, interaction, name, freeze_text)
    _real_causal_mask(model.text)
    model.temperature.max_scale = max_temperature
    if pretrained is not None:
        load_clip_weights(model, pretrained)
    if build_on.type == "meta" and device.type != "meta":
        for part in (model.side, model.video_head, model.interaction, model.temperature):
            materialize(part, device)
        model.reset_new_parameters()
        model.backbone.to(device)
        model.visual_proj.to(device)
        model.text.to(device)
    dtype = resolve_dtype(backbone_dtype)
    if dtype is not None:
        model.backbone.to(dtype)
    return model


def create_retrieval_model(name: str, num_frames: int = 12, pretrained: Optional[str | os.PathLike] = None,
                           device=None, backbone_dtype=None, interaction: Interaction = "wti",
                           freeze_text: bool = False, max_temperature: float = 100.0,
                           **overrides) -> Side4VideoRetrieval:
    """Build a Side4Video retrieval model.

    Args:
        name: a retrieval model name (`s4v_retrieval_b32`, `_b16`, `_l14`, `_e14`, `_tiny`).
        num_frames: frames per clip (12 in every official recipe).
        pretrained: one open_clip / OpenAI CLIP (or open_clip EVA02-CLIP) checkpoint file holding both
            towers; None leaves both randomly initialised.
        interaction: "wti" (weighted token-wise interaction) or "mean" (cosine of mean-pooled frames
            and the EOT token).
        freeze_text: freeze the text tower (the official recipe trains it at lr x 1e-3).
        **overrides: spec fields: backbone/side as in `create_model`, or `text.<field>`.
    """
    from .specs import apply_overrides, get_spec

    spec = get_spec(name)
    if spec.text is None:
        raise ValueError(f"{name!r} is a recognition model, not a retrieval model")
    if overrides:
        spec = apply_overrides(spec, overrides)
    return build_retrieval_model(spec, num_frames, name, pretrained, device, backbone_dtype, interaction,
                                 freeze_text, max_temperature)


# ------------------------------------------------------------------------------ native model files
def save_retrieval_model(model: Side4VideoRetrieval, path: str | os.PathLike, include_backbone: bool = False,
                         preprocess: Optional[dict] = None) -> None:
    """Everything but (optionally) the frozen image tower: side network, heads, text tower, temperature;
    `preprocess`: the test protocol (s4v.infer.preprocess.protocol_dict) that `s4v.load` / `s4v extract` use."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()
          if include_backbone or not k.startswith("backbone.")}
    atomic_torch_save({
        "format": FORMAT, "version": VERSION, "name": model.name,
        "spec": spec_to_dict(model.spec),
        "num_frames": model.num_frames, "interaction": model.interaction.mode,
        "max_temperature": model.temperature.max_scale, "includes_backbone": include_backbone, "state_dict": sd,
        "preprocess": preprocess,
    }, path)


def is_retrieval_file(path: str | os.PathLike) -> bool:
    try:
        ckpt = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a torch file, or an older format: not ours
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


def load_retrieval_model(path: str | os.PathLike, pretrained: Optional[str | os.PathLike] = None, device=None,
                         backbone_dtype=None) -> Side4VideoRetrieval:
    """Load a native retrieval model file; without the tower inside, `pretrained` names the CLIP file."""
    from .weights_file import WeightsFileError, load_torch_file

    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise WeightsFileError(f"{path} is not an s4v retrieval model file")
    spec = spec_from_dict(ckpt["spec"])
    if not ckpt["includes_backbone"] and pretrained is None:
        raise WeightsFileError(f"{path} holds no image tower; pass the tower's weights file as pretrained=PATH "
                               "(model.pretrained=PATH in a config, --pretrained PATH on the command line)")
    with torch.device("meta"):
        model = Side4VideoRetrieval(spec, ckpt["num_frames"], ckpt["interaction"], ckpt["name"])
    _real_causal_mask(model.text)
    model.temperature.max_scale = ckpt["max_temperature"]
    sd = dict(ckpt["state_dict"])
    if not ckpt["includes_backbone"]:
        from .pretrained import resolve_pretrained

        model.backbone.load(resolve_pretrained(spec.backbone, pretrained))
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    assign_state_dict(model, sd, source=str(path))
    model.backbone.freeze()
    model.to(torch.device(device) if device is not None else torch.device("cpu"))
    if backbone_dtype is not None:
        model.backbone.to(resolve_dtype(backbone_dtype))
    return model.eval()
