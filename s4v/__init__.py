"""s4v: Side4Video (a trainable spatial-temporal side network beside a frozen image ViT).

The public API is imported lazily, so `import s4v.data.format` (used by data_prep) does not pay
for torch and open_clip.
"""
import importlib

__version__ = "0.1.0"

_API = {
    "create_model": "s4v.api", "list_models": "s4v.model.factory",
    "load": "s4v.api", "read_video": "s4v.infer.preprocess", "Preprocess": "s4v.infer.preprocess",
    "load_official": "s4v.model.official", "convert_official": "s4v.model.official",
    "load_model": "s4v.model.checkpoint_io", "save_model": "s4v.model.checkpoint_io",
    "MODELS": "s4v.model.specs", "BackboneSpec": "s4v.model.specs", "SideSpec": "s4v.model.specs",
    "ModelSpec": "s4v.model.specs",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 's4v' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
