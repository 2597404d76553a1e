"""Side networks on every tower family (PE-Core, SigLIP2, EVA02-L, DINOv2, DINOv3): tiny towers from
each family's real open_clip/timm configuration, shapes, freezing, gradients, the retrieval zero-init
property, checkpoints written by the libraries themselves, offline `pretrained` names, real sizes."""
import dataclasses
import math
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import s4v
from s4v.model.pretrained import resolve_pretrained
from s4v.model.registry import MODELS, RECOGNITION, RETRIEVAL
from s4v.model.towers import build_tower, position_scheme, timm_name
from s4v.model.weights_file import WeightsFileError

# tiny recognition model -> (its retrieval twin or None, the real model whose config it shrinks)
FAMILIES = {
    "s4v_tiny_eva02": ("s4v_retrieval_tiny_eva02", "s4v_eva02_l14"),
    "s4v_tiny_pe": ("s4v_retrieval_tiny_pe", "s4v_pe_b16"),
    "s4v_tiny_pe_nocls": ("s4v_retrieval_tiny_pe_nocls", "s4v_pe_g14_448"),
    "s4v_tiny_siglip2": ("s4v_retrieval_tiny_siglip2", "s4v_siglip2_b16"),
    "s4v_tiny_dinov2": (None, "s4v_dinov2_l14"),
    "s4v_tiny_dinov3": (None, "s4v_dinov3_l16"),
}
TEXT_FAMILIES = [r for r, _ in FAMILIES.values() if r]


def video(batch=2, frames=4, seed=1):
    return torch.randn(batch, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def ids(n=3, length=16, vocab=1000, seed=2):
    out = torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    out[:, -4:] = 0  # padding
    return out


def build(name, **kw):
    torch.manual_seed(0)
    return s4v.create_model(name, 5, 4, **kw)


@pytest.mark.parametrize("tiny_name", FAMILIES)
def test_tiny_tower_is_the_family_config_shrunk(tiny_name):
    """Same block type, MLP, norms, prefix tokens and position scheme as the real-size tower."""
    real = s4v.create_model(FAMILIES[tiny_name][1], 5, device="meta").backbone.tower
    small = build(tiny_name).backbone.tower
    assert type(small) is type(real) and type(small.blocks[0]) is type(real.blocks[0])
    for part in ("mlp", "norm1", "attn"):
        if hasattr(real.blocks[0], part):
            assert type(getattr(small.blocks[0], part)) is type(getattr(real.blocks[0], part))
    assert small.num_prefix_tokens == real.num_prefix_tokens
    assert position_scheme(small) == position_scheme(real)
    assert len(small.blocks) < len(real.blocks) and small.embed_dim < real.embed_dim


@pytest.mark.parametrize("tiny_name", FAMILIES)
def test_recognition_forward_frozen_tower_and_every_side_parameter_trained(tiny_name):
    model = build(tiny_name)
    model.train()
    assert not model.backbone.tower.training  # eval mode kept
    v = video()
    taps = model.backbone(v.flatten(0, 1))
    w, n = model.spec.backbone.width, model.spec.backbone.num_patches
    assert all(g.shape == (8, 1, w) and p.shape == (8, n, w) for g, p in taps)
    assert all(g.grad_fn is None and p.grad_fn is None for g, p in taps)  # no graph through the tower
    out = model(v)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert not any(p.requires_grad or p.grad is not None for p in model.backbone.parameters())
    missing = [k for k, p in model.trainable_modules().named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, missing


def test_global_token_is_cls_or_patch_mean():
    """Registers never reach the side network; a tower without CLS gives it the mean of the patches."""
    dino3 = build("s4v_tiny_dinov3")
    x = video().flatten(0, 1)
    full = dino3.backbone.tower.forward_intermediates(x, indices=[1], norm=False, output_fmt="NLC",
                                                     intermediates_only=True, return_prefix_tokens=True)
    cls, patches = dino3.backbone(x)[-1]
    assert full[0][1].shape[1] == 5 and torch.equal(cls, full[0][1][:, :1]) and torch.equal(patches, full[0][0])
    sig = build("s4v_tiny_siglip2")
    glob, patches = sig.backbone(x)[-1]
    assert torch.equal(glob, patches.mean(1, keepdim=True))


def _reference_embeddings(model, frames):
    """The tower's own image embedding, computed by timm's full forward with the model's weights."""
    spec = model.spec.backbone
    ref = build_tower(dataclasses.replace(spec, keep_head=True), list(range(spec.layers)), keep_head=True)
    mine = model.visual_proj.state_dict()
    head = {theirs: mine[ours] for ours, theirs in model.visual_proj.checkpoint_keys().items()}
    ref.load_state_dict({**model.backbone.tower.state_dict(), **head}, strict=True)
    return ref.eval()(frames)


@pytest.mark.parametrize("name", TEXT_FAMILIES)
def test_retrieval_forward_and_zero_init_gives_the_towers_own_embeddings(name):
    model = build(name).eval()
    v = video()
    frames = model.encode_video(v)
    ref = _reference_embeddings(model, v.flatten(0, 1))
    assert frames.shape == (2, 4, model.spec.embed_dim)
    torch.testing.assert_close(frames.flatten(0, 1), ref, rtol=1e-5, atol=1e-5)
    model.train()
    logits = model(v, ids())
    assert logits.shape == (3, 2)
    logits.sum().backward()
    assert not any(p.grad is not None for p in model.backbone.parameters())
    side = [k for k, p in model.side.named_parameters() if p.grad is None]
    assert not side and model.video_head.side_proj.grad.abs().sum() > 0


def _open_clip_file(name, tmp_path, fmt="safetensors"):
    """An open_clip CustomTextCLIP of the tower's real config with its towers shrunk to the s4v tiny
    sizes (random weights), saved as open_clip publishes it. Returns (path, state dict)."""
    spec = MODELS[name]
    bb, text = spec.backbone, spec.text
    cfg = open_clip.get_model_config(bb.open_clip_name)
    with torch.device("meta"):
        clip = open_clip.model.CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"],
                                              init_logit_bias=cfg.get("init_logit_bias"))
    torch.manual_seed(3)
    clip.visual.trunk = build_tower(dataclasses.replace(bb, keep_head=True), [], keep_head=True)
    text_cfg = {**cfg["text_cfg"], **{k: getattr(text, k) for k in ("width", "heads", "layers", "context_length",
                                                                     "vocab_size", "mlp_ratio")}}
    text_cfg.pop("hf_tokenizer_name", None), text_cfg.pop("tokenizer_kwargs", None)
    clip.text = open_clip.model._build_text_tower(bb.embed_dim, text_cfg)
    clip.logit_scale = nn.Parameter(torch.tensor(3.5))
    if clip.logit_bias is not None:
        clip.logit_bias = nn.Parameter(torch.tensor(-10.0))
    sd = {k: v.contiguous() for k, v in clip.state_dict().items()}
    assert not any(v.is_meta for v in sd.values())
    if fmt == "safetensors":
        path = tmp_path / "open_clip_model.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(sd, path)
    return path, sd


@pytest.mark.parametrize("name,fmt", [(n, "safetensors") for n in TEXT_FAMILIES] + [("s4v_retrieval_tiny_pe", "bin")])
def test_open_clip_checkpoint_loads_with_every_key_used(name, fmt, tmp_path):
    path, sd = _open_clip_file(name, tmp_path, fmt)
    model = s4v.create_model(name, pretrained=str(path))
    ours = {f"backbone.tower.{k}": v for k, v in model.backbone.tower.state_dict().items()}
    ours.update({f"text.{k}": v for k, v in model.text.state_dict().items()})
    mapped = {f"visual.trunk.{theirs}": model.visual_proj.state_dict()[o]
              for o, theirs in model.visual_proj.checkpoint_keys().items()}
    used = set()
    for key, value in sd.items():
        mine = mapped.get(key) if key in mapped else ours.get(key.replace("visual.trunk.", "backbone.tower.", 1))
        if key == "logit_scale":
            assert model.temperature.init_value == pytest.approx(3.5)
        elif mine is not None:
            assert torch.equal(mine, value), key
        else:
            continue
        used.add(key)
    # logit_bias: SigLIP's sigmoid-loss bias; s4v trains with the softmax InfoNCE loss of the paper
    assert set(sd) - used <= {"logit_bias"}, sorted(set(sd) - used)[:5]
    assert len(ours) + len(mapped) == len(used) - 1  # and every tensor of the model came from the file
    rec = s4v.create_model(name.replace("retrieval_", ""), 5, 4, pretrained=str(path))  # the recognition twin
    assert all(torch.equal(v, sd[f"visual.trunk.{k}"]) for k, v in rec.backbone.tower.state_dict().items())


@pytest.mark.parametrize("name", ["s4v_tiny_dinov2", "s4v_tiny_dinov3"])
def test_timm_checkpoint_loads_with_every_key_used(name, tmp_path):
    bb = MODELS[name].backbone
    torch.manual_seed(4)
    reg = {"reg_tokens": bb.reg_tokens} if bb.family == "dinov2" else {"num_reg_tokens": bb.reg_tokens}
    trunk = timm.create_model(timm_name(bb), pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              embed_dim=64, depth=2, num_heads=2, **reg)
    sd = trunk.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    model = s4v.create_model(name, 5, 4, pretrained=str(tmp_path / "model.safetensors"))
    mine = model.backbone.tower.state_dict()
    assert set(sd) - set(mine) == {"norm.weight", "norm.bias"}  # the final norm: recognition never runs it
    assert all(torch.equal(v, sd[k]) for k, v in mine.items())


def test_dinov2_file_at_another_resolution_gets_its_position_embedding_resampled(tmp_path):
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(5)
    trunk = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, img_size=64,
                              patch_size=8, embed_dim=64, depth=2, num_heads=2)  # 8x8 grid (a 518px file, shrunk)
    torch.save(trunk.state_dict(), tmp_path / "dino.pth")
    model = s4v.create_model("s4v_tiny_dinov2", 5, 4, pretrained=str(tmp_path / "dino.pth"))  # 4x4 grid
    want = resample_abs_pos_embed(trunk.pos_embed, (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(model.backbone.tower.pos_embed, want)


# ----------------------------------------------------------------------------- pretrained names
def _fake_hf_cache(root, repo, filename, payload: bytes = b"x"):
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    snap = folder / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(payload)
    return snap / filename


def test_pretrained_tags_and_hf_hub_names_resolve_offline_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pe = RECOGNITION["s4v_pe_b16"].backbone
    with pytest.raises(WeightsFileError, match=r"timm/PE-Core-B-16 are not in the local Hugging Face cache .*"
                                               r"open_clip_model\.safetensors"):
        resolve_pretrained(pe, "meta")
    with pytest.raises(WeightsFileError, match=r"tags: meta"):
        resolve_pretrained(pe, "laion2b")
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        resolve_pretrained(pe, "/no/such/file.safetensors")
    cached = _fake_hf_cache(tmp_path, "timm/PE-Core-B-16", "open_clip_model.safetensors")
    assert resolve_pretrained(pe, "meta") == str(cached)
    dino = RECOGNITION["s4v_dinov2_l14"].backbone
    cached = _fake_hf_cache(tmp_path, "timm/vit_large_patch14_dinov2.lvd142m", "model.safetensors")
    assert resolve_pretrained(dino, "lvd142m") == str(cached)


def test_hf_hub_name_builds_a_model_from_the_cache(tmp_path, monkeypatch):
    path, sd = _open_clip_file("s4v_retrieval_tiny_siglip2", tmp_path)
    cache = tmp_path / "hub"
    _fake_hf_cache(cache, "me/tiny-siglip2", "open_clip_model.safetensors", path.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model = s4v.create_model("s4v_retrieval_tiny_siglip2", pretrained="hf-hub:me/tiny-siglip2")
    assert torch.equal(model.text.token_embedding.weight, sd["text.token_embedding.weight"])
    with pytest.raises(WeightsFileError, match="me/other"):
        s4v.create_model("s4v_tiny_siglip2", 5, pretrained="hf-hub:me/other")


# ----------------------------------------------------------------------------- real sizes
def _library_tower_params(bb) -> int:
    """The library's own image tower at the model's resolution, without the final norm/pool/head."""
    with torch.device("meta"):
        if bb.family == "clip":
            tower = open_clip.create_model(bb.open_clip_name, device="meta").visual
            drop = ("ln_post.", "proj")
        else:
            tower = timm.create_model(timm_name(bb), pretrained=False, img_size=bb.image_size, num_classes=0)
            drop = ("norm.", "attn_pool.", "fc_norm.", "head.")
    return sum(p.numel() for n, p in tower.named_parameters() if not n.startswith(drop))


PAPER = {"s4v_retrieval_b32", "s4v_retrieval_b16", "s4v_retrieval_l14", "s4v_retrieval_e14"}  # tests/test_retrieval.py
# trainable parameters (174 classes, 8 frames), as printed by `s4v info` and the README table
TRAINABLE = {
    "s4v_l14_336": 102_272_686, "s4v_eva02_l14": 102_108_846, "s4v_pe_b16": 21_112_686,
    "s4v_pe_l14_336": 102_272_686, "s4v_pe_g14_448": 140_342_766, "s4v_siglip2_b16": 21_112_686,
    "s4v_siglip2_so400m14": 60_953_774, "s4v_dinov2_l14": 102_108_846, "s4v_dinov3_l16": 102_354_606,
}


def _slow_if_giant(names):  # G/14-size towers take seconds even on meta; they still run in `make test`
    return [pytest.param(n, marks=pytest.mark.slow) if "_g14" in n else n for n in names]


@pytest.mark.parametrize("name", _slow_if_giant(sorted(TRAINABLE)))
def test_real_size_models_on_meta(name):
    model = s4v.create_model(name, 174, 8, device="meta")
    bb = model.spec.backbone
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == _library_tower_params(bb)
    assert sum(p.numel() for p in model.trainable_parameters()) == TRAINABLE[name]
    taps = model.backbone.taps
    assert taps[-1] == bb.layers - 1 and len(taps) == (bb.layers if bb.layers <= 24 else math.ceil(bb.layers / 2))


@pytest.mark.parametrize("name", _slow_if_giant(sorted(n for n in RETRIEVAL if "tiny" not in n and n not in PAPER)))
def test_real_size_retrieval_models_on_meta(name):
    model = s4v.create_model(name, device="meta")
    bb = model.spec.backbone
    assert model.backbone.taps[-1] == bb.layers - 1 and model.side.spec.width == 320
    cfg = open_clip.get_model_config(bb.open_clip_name)
    with torch.device("meta"):
        text = open_clip.create_model(bb.open_clip_name, device="meta").text if "custom_text" in cfg else None
    if text is not None:
        assert sum(p.numel() for p in model.text.parameters()) == sum(p.numel() for p in text.parameters())


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", ["ssv2_pe_l14_336_f8", "ssv2_siglip2_b16_f8", "msrvtt_pe_l14_336_f12",
                                    "msrvtt_siglip2_b16_f12"])
def test_new_tower_recipes_load_and_normalise_as_their_tower(recipe):
    from s4v.config import ConfigError
    from s4v.experiment import load_experiment

    path = str(Path(__file__).resolve().parents[1] / "ds_configs" / "experiments" / f"{recipe}.yaml")
    cfg = load_experiment(path)
    assert tuple(cfg.data.mean) == (0.5, 0.5, 0.5) and cfg.data.image_size == MODELS[cfg.model.name].backbone.image_size
    with pytest.raises(ConfigError, match=r"tower expects mean \[0.5, 0.5, 0.5\]"):
        load_experiment(path, ["data.mean=[0.48145466,0.4578275,0.40821073]"])


@pytest.mark.parametrize("name,tokens", [("s4v_siglip2_b16", "no CLS, absolute positions; side prompt: patch mean"),
                                         ("s4v_tiny_dinov3", "CLS + 4 registers, rope positions; side prompt: CLS"),
                                         ("s4v_retrieval_tiny_pe", "CLS, absolute+rope positions; side prompt: CLS")])
def test_info_reports_tokens_params_and_flops_on_meta(name, tokens, capsys):
    from s4v.cli.main import main

    assert main(["info", name]) == 0
    out = capsys.readouterr().out
    assert tokens in out and "trainable" in out and "GFLOPs/view" in out
    if name in TRAINABLE:
        assert f"trainable {TRAINABLE[name]:,}" in out


def test_training_accepts_pretrained_names_from_the_cache(tmp_path, monkeypatch):
    """`model.pretrained: meta` (a tag) or `hf-hub:...` passes the start-up check when the cache holds it,
    names what is missing when not, and a run directory keeps the name as given (not as a path)."""
    from s4v.experiment import load_experiment
    from s4v.train.preflight import pretrained_problem
    from s4v.train.run_dir import with_absolute_paths

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_experiment(None, ["model.name=s4v_pe_b16", "model.pretrained=meta", "data.mean=[0.5,0.5,0.5]",
                                 "data.std=[0.5,0.5,0.5]"])
    assert "not in the local Hugging Face cache" in pretrained_problem(cfg)
    _fake_hf_cache(tmp_path, "timm/PE-Core-B-16", "open_clip_model.safetensors")
    assert pretrained_problem(cfg) is None
    assert with_absolute_paths(cfg, tmp_path).model.pretrained == "meta"
    cfg.model.pretrained = "hf-hub:timm/PE-Core-B-16"
    assert with_absolute_paths(cfg, tmp_path).model.pretrained == "hf-hub:timm/PE-Core-B-16"
    cfg.model.pretrained = "weights/tower.pt"
    assert with_absolute_paths(cfg, tmp_path).model.pretrained == str(tmp_path / "weights/tower.pt")
    assert "no weights file" in pretrained_problem(cfg)


def test_data_normalisation_left_at_its_default_follows_the_tower():
    """Choosing model.name is enough: data.mean/std left at their (CLIP) defaults become the tower's; an
    explicit mismatch is still refused."""
    from s4v.config import ConfigError
    from s4v.experiment import load_experiment

    assert load_experiment(None, ["model.name=s4v_siglip2_b16"]).data.std == (0.5, 0.5, 0.5)
    assert load_experiment(None, ["model.name=s4v_b16"]).data.mean[0] == pytest.approx(0.48145466)
    with pytest.raises(ConfigError, match="tower expects mean"):
        load_experiment(None, ["model.name=s4v_siglip2_b16", "data.std=[0.3,0.3,0.3]"])


def test_wrong_timm_tag_or_a_folder_as_pretrained_is_one_clear_error(tmp_path):
    """A wrong DINO tag gave timm's raw RuntimeError; a folder (a Hugging Face snapshot) passed the
    training preflight, then failed in the tower load with a traceback."""
    from s4v.experiment import load_experiment
    from s4v.train.preflight import pretrained_problem

    dino = RECOGNITION["s4v_dinov2_l14"].backbone
    with pytest.raises(WeightsFileError, match=r"nor a timm pretrained tag .*tags: .*lvd142m"):
        resolve_pretrained(dino, "bogus")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsFileError, match=r"is a folder, not a weights file.*holds model\.safetensors"):
        resolve_pretrained(dino, str(snapshot))
    for value in ("lvd142mm", str(snapshot)):
        problem = pretrained_problem(load_experiment(None, ["model.name=s4v_dinov2_l14", f"model.pretrained={value}"]))
        assert problem and ("tags:" in problem or "is a folder" in problem), problem
