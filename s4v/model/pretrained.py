"""`pretrained=`: a local weights file, or a published name resolved OFFLINE from the local Hugging
Face cache. s4v never downloads: a name that is not in the cache is an error naming the repository and
the files it looked for.

Accepted names: an open_clip pretrained tag of the tower's open_clip config (`"meta"` for PE-Core,
`"webli"` for SigLIP2, `"openai"` for CLIP, ...), a timm pretrained tag of a timm-only tower
(`"lvd142m"` for DINOv2), or `hf-hub:ORG/NAME`. The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`,
else `~/.cache/huggingface/hub`; OpenAI's own `.pt` archives are also looked for in `~/.cache/clip`
(open_clip's download folder).
"""
from __future__ import annotations

import os
from pathlib import Path

from .specs import BackboneSpec
from .weights_file import WeightsFileError

# The file names open_clip and timm publish weights under, in the order they are tried.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def find_in_hf_cache(repo: str, files) -> str:
    """The cached path of the first of `files` in `repo` (no network), or a WeightsFileError."""
    from huggingface_hub import try_to_load_from_cache

    repo = repo.strip("/")
    cache = hf_cache_dir()
    for name in files:
        found = try_to_load_from_cache(repo, name, cache_dir=str(cache))
        if isinstance(found, str) and os.path.isfile(found):
            return found
    raise WeightsFileError(
        f"pretrained weights {repo} are not in the local Hugging Face cache {cache} (looked for "
        f"{' or '.join(files)}). s4v does not download: run `huggingface-cli download {repo} {files[0]}` "
        "where there is network and copy the cache here (or set HF_HUB_CACHE), or pass a local file")


def _open_clip_source(spec: BackboneSpec, tag: str) -> tuple[str, tuple[str, ...], str]:
    """(repository, file names, OpenAI url) of an open_clip pretrained tag of the tower's config."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.open_clip_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.open_clip_name)
        raise WeightsFileError(f"pretrained={tag!r} is neither a file nor an open_clip pretrained tag of "
                               f"{spec.open_clip_name} (tags: {', '.join(tags) or 'none'})")
    hub = cfg.get("hf_hub", "").rstrip("/")
    files = OPEN_CLIP_FILES
    if hub.count("/") > 1:  # "org/repo/file"
        hub, _, file = hub.rpartition("/")
        files = (file,)
    return hub, files, cfg.get("url", "")


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _timm_source(spec: BackboneSpec, tag: str) -> tuple[str, tuple[str, ...]]:
    import timm

    name = f"{spec.timm_name}.{tag}"
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm: "Invalid pretrained tag (...)"
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{spec.timm_name}.*")]
        raise WeightsFileError(f"pretrained={tag!r} is neither a file nor a timm pretrained tag of "
                               f"{spec.timm_name} (tags: {', '.join(tags) or 'none'})")
    return cfg.hf_hub_id, TIMM_FILES


def resolve_pretrained(spec: BackboneSpec, pretrained: str | os.PathLike) -> str:
    """A local file path for `pretrained` (a path, an open_clip/timm tag or `hf-hub:` name), offline."""
    text = os.fspath(pretrained)
    if os.path.isdir(text):  # e.g. a Hugging Face snapshot folder
        inside = sorted(p.name for p in Path(text).iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        raise WeightsFileError(f"pretrained={text!r} is a folder, not a weights file; pass the file itself"
                               + (f" (it holds {', '.join(inside[:6])})" if inside else ""))
    if os.path.exists(text):
        return text
    if text.startswith("hf-hub:"):
        repo = text[len("hf-hub:"):]
        return find_in_hf_cache(repo, OPEN_CLIP_FILES + TIMM_FILES)
    if os.sep in text or text.endswith(WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"checkpoint file not found: {text}")
    if spec.open_clip_name:
        repo, files, url = _open_clip_source(spec, text)
        if url:  # OpenAI archives: open_clip's own download folder first
            cached = Path("~/.cache/clip").expanduser() / url.rsplit("/", 1)[-1]
            if cached.is_file():
                return str(cached)
        if not repo:
            raise WeightsFileError(f"pretrained={text!r} of {spec.open_clip_name} is published only at {url}; "
                                   "download it and pass the file")
        return find_in_hf_cache(repo, files)
    repo, files = _timm_source(spec, text)
    return find_in_hf_cache(repo, files)
