"""Load checkpoints saved by the official Side4Video recognition training.

`load_official(path, num_frames)` infers every dimension it can from the tensors, renames the keys
to s4v's and returns a ready model (eval mode). `convert_official` writes it as a native s4v file.
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional

import torch

from .backbone import assign_state_dict, read_state_dict
from .classifier import Side4VideoClassifier
from .factory import build_model
from .specs import BackboneSpec, ModelSpec, SideSpec

# Official side-network key (after `visual.`, CLIP's `transformer.` removed) -> s4v key.
_SIDE_RENAMES = [
    (r"side_conv1\.(.*)", r"side.stem.conv.\1"),
    (r"side_pre_bn3d\.(.*)", r"side.stem.bn.\1"),
    (r"side_spatial_position_embeddings", r"side.pos_embed"),
    (r"side_post_bn\.(.*)", r"head.bn.\1"),
    (r"side_lns\.(\d+)\.(.*)", r"side.taps.\1.norm.\2"),
    (r"side_linears\.(\d+)\.(.*)", r"side.taps.\1.proj.\2"),
    (r"side_(?:transformer|blocks)\.(\d+)\.bn_1\.(.*)", r"side.blocks.\1.bn1.\2"),
    (r"side_(?:transformer|blocks)\.(\d+)\.bn_2\.(.*)", r"side.blocks.\1.bn2.\2"),
    (r"side_(?:transformer|blocks)\.(\d+)\.conv\.0\.(.*)", r"side.blocks.\1.temporal.pw1.\2"),
    (r"side_(?:transformer|blocks)\.(\d+)\.conv\.1\.(.*)", r"side.blocks.\1.temporal.dw.\2"),
    (r"side_(?:transformer|blocks)\.(\d+)\.conv\.2\.(.*)", r"side.blocks.\1.temporal.pw2.\2"),
    (r"side_(?:transformer|blocks)\.(\d+)\.mlp\.(?:fc1|0)\.(.*)", r"side.blocks.\1.mlp.fc1.\2"),
    (r"side_(?:transformer|blocks)\.(\d+)\.mlp\.(?:fc2|2)\.(.*)", r"side.blocks.\1.mlp.fc2.\2"),
    (r"side_(?:transformer|blocks)\.(\d+)\.attn\.in_proj_(weight|bias)", r"side.blocks.\1.attn.qkv.\2"),
    (r"side_(?:transformer|blocks)\.(\d+)\.attn\.[qkv]_proj\.(weight|bias)", r"side.blocks.\1.attn.qkv.\2"),
    (r"side_(?:transformer|blocks)\.(\d+)\.attn\.(?:out_proj|proj)\.(.*)", r"side.blocks.\1.attn.proj.\2"),
    (r"side_(?:transformer|blocks)\.(\d+)\.ln_1\.(.*)", r"side.blocks.\1.ln.\2"),
]


def detect_family(sd: dict[str, torch.Tensor]) -> str:
    if "visual.transformer.resblocks.0.attn.in_proj_weight" in sd:
        return "clip"
    if "visual.blocks.0.attn.qkv.weight" in sd:
        return "eva"
    raise ValueError("not an official Side4Video recognition checkpoint: found neither CLIP "
                     "('visual.transformer.resblocks.*') nor EVA ('visual.blocks.*') backbone keys")


def map_official_key(key: str) -> str:
    """s4v name of an official checkpoint key (backbone keys go under `backbone.tower.`)."""
    if key.startswith("fc."):
        return "head." + key
    if not key.startswith("visual."):
        raise KeyError(f"unexpected key outside 'visual.'/'fc.': {key}")
    rest = key[len("visual."):]
    side = rest.removeprefix("transformer.")
    if side.startswith("side_"):
        for pattern, repl in _SIDE_RENAMES:
            if re.fullmatch(pattern, side):
                return re.sub(pattern, repl, side)
        raise KeyError(f"unknown official side-network key: {key}")
    return "backbone.tower." + rest


def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official `model_state_dict` -> s4v `Side4VideoClassifier.state_dict()` layout."""
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        new = map_official_key(key)
        m = re.search(r"attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:  # EVA keeps separate q/k/v projections; s4v fuses them (rows q;k;v as nn.MultiheadAttention)
            qkv_parts.setdefault(new, {})[m.group(1)] = value
            continue
        if new.endswith(("temporal.pw1.weight", "temporal.pw2.weight")):
            value = value.flatten(1)  # 1x1x1 Conv3d -> Linear
        elif new.endswith("temporal.dw.weight"):
            value = value.flatten(2).unsqueeze(-1)  # (3,1,1) Conv3d -> (3,1) Conv2d
        out[new] = value
    for new, parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"incomplete q/k/v projections for {new}: have {sorted(parts)}")
        out[new] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def infer_spec(sd: dict[str, torch.Tensor], backbone_heads: Optional[int] = None,
               side_heads: Optional[int] = None) -> tuple[ModelSpec, int]:
    """Model spec and class count of an official checkpoint. Heads cannot be inferred from weights:
    the defaults are width // 64 (CLIP) or width // 112 (EVA-E's head width) and side width // 64."""
    family = detect_family(sd)
    num_classes = sd["fc.weight"].shape[0]
    side_w = sd["visual.side_conv1.weight"]
    side_dim, k_t = side_w.shape[0], side_w.shape[2]
    n_taps = len({m.group(1) for k in sd if (m := re.match(r"visual\.(?:transformer\.)?side_lns\.(\d+)\.", k))})
    if family == "clip":
        conv = sd["visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
        n_pos = sd["visual.positional_embedding"].shape[0]
        hidden = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        embed_dim = sd["visual.proj"].shape[1] if "visual.proj" in sd else width
        heads = backbone_heads or width // 64
        blk = "visual.transformer.side_transformer.0."
        side_hidden = sd[blk + "mlp.fc1.weight"].shape[0]
        ln_w = sd["visual.transformer.side_lns.0.weight"].shape[0]
        keep_head = "visual.proj" in sd
        name = "ViT-B-16-quickgelu"  # the OpenAI towers use QuickGELU
    else:
        conv = sd["visual.patch_embed.proj.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        layers = len({k.split(".")[2] for k in sd if k.startswith("visual.blocks.")})
        n_pos = sd["visual.pos_embed"].shape[1]
        hidden = sd["visual.blocks.0.mlp.fc1.weight"].shape[0]
        embed_dim = sd["visual.head.weight"].shape[0] if "visual.head.weight" in sd else width
        heads = backbone_heads or max(1, width // 112)
        blk = "visual.side_blocks.0."
        side_hidden = sd[blk + "mlp.0.weight"].shape[0]
        ln_w = sd["visual.side_lns.0.weight"].shape[0]
        keep_head = "visual.head.weight" in sd
        name = "EVA02-E-14"
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ValueError(f"position embedding with {n_pos} rows is not CLS + a square grid")
    if layers % n_taps:
        raise ValueError(f"{n_taps} side taps do not divide {layers} backbone layers evenly")
    tap_every = layers // n_taps
    # timm/open_clip compute the MLP width as int(width * mlp_ratio); pick a ratio that gives `hidden`.
    mlp_ratio = hidden / width if int(width * (hidden / width)) == hidden else (hidden + 0.5) / width
    backbone = BackboneSpec(family, name, grid * patch, patch, width, layers, heads, mlp_ratio,
                            embed_dim, keep_head)
    side = SideSpec(
        width=side_dim, tap_every=tap_every,
        tap_order="norm_linear" if ln_w == width else "linear_norm",
        block_norm="pre" if family == "clip" else "post",
        post_bn="visual.side_post_bn.weight" in sd,
        heads=side_heads, mlp_ratio=side_hidden / side_dim,
        temporal_ratio=sd[blk + "conv.0.weight"].shape[0] / side_dim, temporal_kernel=k_t,
        pos_init_std=0.01 if family == "clip" else 0.02, init="clip" if family == "clip" else "default")
    return ModelSpec(backbone, side, f"converted official Side4Video ({family})"), num_classes


def load_official(path: str | os.PathLike, num_frames: int, backbone_heads: Optional[int] = None,
                  side_heads: Optional[int] = None, device=None) -> Side4VideoClassifier:
    """A ready s4v model (eval mode) from an official Side4Video recognition checkpoint."""
    sd = read_state_dict(path)
    spec, num_classes = infer_spec(sd, backbone_heads, side_heads)
    model = build_model(spec, num_classes, num_frames, name="official", device="meta")
    assign_state_dict(model, convert_state_dict(sd), source=str(path))
    model.to(torch.device(device) if device is not None else torch.device("cpu"))
    return model.eval()


def convert_official(src: str | os.PathLike, dst: str | os.PathLike, num_frames: int,
                     backbone_heads: Optional[int] = None, side_heads: Optional[int] = None) -> None:
    """Write an official checkpoint as a native s4v checkpoint (backbone included)."""
    from .checkpoint_io import save_model

    save_model(load_official(src, num_frames, backbone_heads, side_heads), dst, include_backbone=True)
