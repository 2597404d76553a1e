"""The frozen image tower: built from open_clip or timm (s4v/model/towers.py), loaded from a local
file, run without autograd, returning the tokens of the tapped layers. No training code here."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .specs import BackboneSpec
from .towers import adapt_tower_state_dict, build_tower, tapped_tokens  # noqa: F401 - build_tower re-exported
from .weights_file import WeightsFileError, not_a_weights_file

log = logging.getLogger(__name__)

# Tower parts that recognition never runs; a checkpoint may carry them (open_clip, OpenAI, EVA files).
_UNUSED_PREFIXES = ("ln_post.", "proj", "norm.", "head.", "fc_norm.", "attn_pool.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file: open_clip (`.pt`/`.bin`, optionally under 'state_dict'), safetensors,
    OpenAI's TorchScript archives, or an official Side4Video checkpoint ('model_state_dict')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - SafetensorError and friends
            raise not_a_weights_file(path, err) from err
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as err:
            if "TorchScript" not in str(err) and "constants.pkl" not in str(err):
                raise not_a_weights_file(path, err) from err
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()  # OpenAI CLIP archive
        except Exception as err:  # noqa: BLE001 - a foreign file makes the unpickler raise anything
            raise not_a_weights_file(path, err) from err
    for key in ("model_state_dict", "state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsFileError(f"not a weights file: {path} (it does not hold a state dict of tensors)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def tower_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pick the image tower's weights out of a full checkpoint and name them as the tower does.

    open_clip EVA (`visual.trunk.*`), open_clip/OpenAI CLIP and official EVA-CLIP (`visual.*`), or a
    bare tower. Side4Video side-network keys (`*side_*`) and classifiers (`fc.*`) are dropped.
    """
    if any(k.startswith("visual.") for k in sd):
        prefix = "visual.trunk." if any(k.startswith("visual.trunk.") for k in sd) else "visual."
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in sd.items() if "side_" not in k and not k.startswith("fc.")}


def load_tower_weights(tower: nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint",
                       what: str = "backbone") -> None:
    """Load `sd` into `tower` strictly (shapes and key sets), tolerating only unused head keys.

    A tower on the meta device gets the tensors assigned (no second copy in memory)."""
    expected = tower.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not k.startswith(_UNUSED_PREFIXES)]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                parts.append(f"{len(items)} {title} (e.g. {', '.join(items[:4])})")
        raise WeightsFileError(f"{what} weights in {source} do not match the model's tower: " + "; ".join(parts)
                         + ". Is it the right model name / checkpoint?")
    assign_state_dict(tower, {k: sd[k] for k in expected}, source)


def assign_state_dict(module: nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """`load_state_dict(strict=True)`; a module on the meta device takes the tensors themselves
    (no second copy in memory) and gets its non-persistent buffers initialised."""
    is_meta = any(t.is_meta for t in module.state_dict().values())
    module.load_state_dict(sd, strict=True, assign=is_meta)
    if not is_meta:
        return
    for sub in module.modules():  # non-persistent buffers, e.g. timm Eva's zero k_bias
        init = getattr(sub, "init_non_persistent_buffers", None)
        meta = [n for n, b in sub.named_buffers(recurse=False) if b.is_meta]
        if init is not None and meta:
            for n in meta:
                setattr(sub, n, torch.empty_like(getattr(sub, n), device="cpu"))
            init()
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left uninitialised after loading {source}: {left[:4]}")


class FrozenBackbone(nn.Module):
    """A frozen open_clip/timm image tower that returns the tokens of the tapped layers.

    No parameter requires grad, the tower stays in eval mode even after `.train()`, and it runs
    under `torch.no_grad()`, so autograd records nothing for it.
    """

    def __init__(self, spec: BackboneSpec, taps: list[int]):
        super().__init__()
        self.spec = spec
        self.family = spec.family
        self.taps = list(taps)
        self.tower = build_tower(spec, self.taps, spec.keep_head)
        self.freeze()

    def freeze(self) -> None:
        self.tower.requires_grad_(False)
        self.tower.eval()

    def train(self, mode: bool = True) -> "FrozenBackbone":
        super().train(mode)
        self.tower.eval()  # frozen means frozen: no dropout, no BN updates, whatever the caller says
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def load(self, path: str | os.PathLike) -> None:
        self.load_state(tower_state_dict(read_state_dict(path)), str(path))

    def load_state(self, sd: dict[str, torch.Tensor], source: str) -> None:
        """The tower's weights from `sd` (named as the tower, see `tower_state_dict`)."""
        load_tower_weights(self.tower, adapt_tower_state_dict(self.tower, self.spec, sd), source=source)
        self.freeze()

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`frames` `[B*T, 3, H, W]` -> per tapped layer (global token `[B*T, 1, W]`, patches `[B*T, N, W]`),
        in the tower's dtype, raw block outputs (before any final norm). The global token is the CLS
        token, or the mean of the patches for a tower without one (s4v/model/towers.py)."""
        return tapped_tokens(self.tower, self.spec, frames.to(self.dtype), self.taps)


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """Give a meta-device module real storage on `device` and run every module's own init,
    children before parents (so SideNetwork's init wins over the Linear defaults)."""
    module.to_empty(device=device)
    with torch.no_grad():
        for sub in reversed(list(module.modules())):
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
            elif hasattr(sub, "reset_running_stats"):
                sub.reset_running_stats()


def resolve_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return names[dtype]
