"""Native s4v model files: the model's spec plus its weights, written atomically.

A file may leave out the frozen backbone (a release of the trained side network and head); it is
then loaded together with a backbone weights file.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from s4v.fileio import atomic_torch_save

from .backbone import assign_state_dict
from .classifier import Side4VideoClassifier
from .factory import build_model
from .specs import spec_from_dict
from .weights_file import WeightsFileError, load_torch_file

FORMAT = "s4v-model"
VERSION = 1


def save_model(model: Side4VideoClassifier, path: str | os.PathLike, include_backbone: bool = False,
               classes: Optional[list[str]] = None, preprocess: Optional[dict] = None) -> None:
    """`classes`: the class names in label order (the train index's), kept so that `s4v eval` can refuse
    a split whose labels mean other classes; default: `model.class_names` if the model was loaded with them.
    `preprocess`: the test protocol (s4v.infer.preprocess.protocol_dict) that `s4v.load` / `s4v predict` use.
    A retrieval model is written in its own format (`s4v.model.retrieval.save_retrieval_model`)."""
    if getattr(model.spec, "text", None) is not None:
        from .retrieval import save_retrieval_model

        return save_retrieval_model(model, path, include_backbone, preprocess)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()
          if include_backbone or not k.startswith("backbone.")}
    atomic_torch_save({
        "format": FORMAT, "version": VERSION, "name": model.name,
        "spec": dataclasses.asdict(model.spec), "num_classes": model.num_classes,
        "num_frames": model.num_frames, "includes_backbone": include_backbone, "state_dict": sd,
        "classes": list(classes) if classes else getattr(model, "class_names", None),
        "preprocess": preprocess,
    }, path)


def model_file_classes(path: str | os.PathLike) -> tuple[Optional[list[str]], Optional[int]]:
    """(class names, or None in files written without them; number of outputs) of a native s4v model
    file, read without building the model (tensors memory-mapped). (None, None) for any other file."""
    try:
        ckpt = load_torch_file(path, mmap=True)
    except WeightsFileError:
        return None, None  # load_model says what is wrong with it
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        return None, None
    return ckpt.get("classes"), ckpt.get("num_classes")


def load_model(path: str | os.PathLike, pretrained: Optional[str | os.PathLike] = None,
               device=None, backbone_dtype=None) -> Side4VideoClassifier:
    """Load a native s4v model file. Without backbone weights inside, `pretrained` must name the
    tower's weights file. Returned in eval mode, with `class_names` (None in files without them)."""
    ckpt = load_torch_file(path)
    from .retrieval import FORMAT as RETRIEVAL_FORMAT, load_retrieval_model

    if isinstance(ckpt, dict) and ckpt.get("format") == RETRIEVAL_FORMAT:  # one entry point for both kinds
        return load_retrieval_model(path, pretrained, device, backbone_dtype)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise WeightsFileError(f"{path} is not an s4v model file (for official Side4Video checkpoints "
                               "use s4v.load_official / `s4v convert-official`)")
    spec = spec_from_dict(ckpt["spec"])
    if not ckpt["includes_backbone"] and pretrained is None:
        raise WeightsFileError(f"{path} holds only the side network and head; pass the backbone weights file "
                               "as pretrained=PATH (model.pretrained=PATH in a config, --pretrained PATH on the command line)")
    model = build_model(spec, ckpt["num_classes"], ckpt["num_frames"], ckpt["name"],
                        pretrained=pretrained if not ckpt["includes_backbone"] else None, device="meta")
    sd = dict(ckpt["state_dict"])
    if not ckpt["includes_backbone"]:
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    try:
        assign_state_dict(model, sd, source=str(path))
    except RuntimeError as err:  # load_state_dict's key/shape report: a damaged or edited file
        raise WeightsFileError(f"{path} does not match its own model spec: {str(err).splitlines()[0]} ...") from err
    model.to(torch.device(device) if device is not None else torch.device("cpu"))
    if backbone_dtype is not None:
        from .backbone import resolve_dtype

        model.backbone.to(resolve_dtype(backbone_dtype))
    model.class_names = ckpt.get("classes")
    return model.eval()
