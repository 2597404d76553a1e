"""Reading weights files with one clear error for anything that is not one.

torch.load on a corrupt file, a text file or a pickle of other objects raises whatever its unpickler
hits (UnpicklingError, KeyError, EOFError, RuntimeError) and, with `weights_only=True`, advises
re-running with `weights_only=False`: that would execute the file's code, so s4v never passes it on.
"""
from __future__ import annotations

import os
import re

import torch


class WeightsFileError(ValueError):
    """A weights file that cannot be used: not a weights file at all, or one of another model."""


def not_a_weights_file(path: str | os.PathLike, err: BaseException) -> WeightsFileError:
    """`not a weights file: PATH (reason)`, the reason cut out of torch's message, without its advice."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|Check the documentation|$)", text, re.S)
    reason = found.group(1) if found else (text.strip().splitlines() or [""])[0]
    reason = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    return WeightsFileError(f"not a weights file: {path} ({reason[:200]}; expected a PyTorch checkpoint of "
                            "tensors, a .safetensors file or an OpenAI CLIP TorchScript archive)")


def load_torch_file(path: str | os.PathLike, map_location="cpu", mmap: bool = False):
    """`torch.load(path, weights_only=True)`; any failure to unpickle is a WeightsFileError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (OSError, MemoryError) as err:
        if isinstance(err, (FileNotFoundError, PermissionError, MemoryError)):
            raise
        raise not_a_weights_file(path, err) from err
    except Exception as err:  # noqa: BLE001 - the unpickler raises anything from a foreign file
        raise not_a_weights_file(path, err) from err
