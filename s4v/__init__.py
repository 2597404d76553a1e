"""s4v: Side4Video (a trainable spatial-temporal side network beside a frozen image ViT)."""
__version__ = "0.1.0"

from .model.factory import create_model, list_models  # noqa: E402
from .model.official import convert_official, load_official  # noqa: E402
from .model.specs import MODELS, BackboneSpec, ModelSpec, SideSpec  # noqa: E402

__all__ = ["create_model", "list_models", "load_official", "convert_official", "MODELS",
           "BackboneSpec", "SideSpec", "ModelSpec", "__version__"]
