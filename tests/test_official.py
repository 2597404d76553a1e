"""Official Side4Video checkpoints: numerical parity on the fixtures, key mapping, conversion, weights IO."""
import json
import subprocess
import sys

import pytest
import torch

import s4v
from s4v.model.checkpoint_io import load_model, save_model
from s4v.model.official import convert_state_dict, map_official_key
from s4v.model.side_net import SideBlock
from s4v.model.specs import SideSpec


def _io(reference_dir, family):
    return torch.load(reference_dir / f"parity_tiny_{family}" / "io.pt", weights_only=False)


@pytest.mark.parametrize("family", ["clip", "eva"])
def test_parity_with_official_logits(reference_dir, family):
    io = _io(reference_dir, family)
    model = s4v.load_official(reference_dir / f"parity_tiny_{family}" / "checkpoint.pt", num_frames=4,
                              backbone_heads=2)
    assert model.spec.backbone.family == family and not model.training
    with torch.no_grad():
        assert (model(io["video"]) - io["logits"]).abs().max() < 2e-6
        model.double()
        assert (model(io["video"].double()) - io["logits_fp64"]).abs().max() < 1e-9


def test_parity_detects_a_wrong_head_count(reference_dir):
    io = _io(reference_dir, "clip")
    model = s4v.load_official(reference_dir / "parity_tiny_clip" / "checkpoint.pt", num_frames=4)  # 1 head
    with torch.no_grad():
        assert (model.double()(io["video"].double()) - io["logits_fp64"]).abs().max() > 1e-6


@pytest.mark.parametrize("family,prefix,seq_first", [
    ("clip", "visual.transformer.side_transformer.0.", True), ("eva", "visual.side_blocks.0.", False)])
def test_side_block_with_two_heads(reference_dir, family, prefix, seq_first):
    fx = torch.load(reference_dir / f"parity_tiny_{family}" / "side_block_2heads.pt", weights_only=False)
    sd = convert_state_dict({prefix + k: v for k, v in fx["state_dict"].items()})
    spec = SideSpec(128, block_norm="pre" if family == "clip" else "post")
    block = SideBlock(128, spec)
    block.load_state_dict({k.removeprefix("side.blocks.0."): v for k, v in sd.items()}, strict=True)
    block.eval().double()
    x, tok = fx["x"].double(), fx["x_token"].double()
    if seq_first:  # the official CLIP block is sequence-first [N, B*T, D]
        x, tok = x.transpose(0, 1), tok.transpose(0, 1)
    with torch.no_grad():
        out = block(x, tok, fx["side_spatial_position_embeddings"].double(), num_frames=4)
    expected = fx["out_fp64"].transpose(0, 1) if seq_first else fx["out_fp64"]
    assert (out - expected).abs().max() < 1e-9


def _key_list(path):
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return {k: json.loads(shape) for k, shape, _ in rows}


@pytest.mark.parametrize("name,keyfile", [("s4v_b16", "official_keys_ViT-B-16.txt"),
                                          ("s4v_l14", "official_keys_ViT-L-14.txt"),
                                          ("s4v_e14", "official_keys_EVA02-E-14.txt")])
def test_every_official_key_is_mapped(reference_dir, name, keyfile):
    official = _key_list(reference_dir / keyfile)
    overrides = {"backbone.keep_head": True} if name == "s4v_e14" else {}  # official E/14 keeps norm/head
    ours = s4v.create_model(name, 174, 8, device="meta", **overrides).state_dict()
    fused = {}
    for key, shape in official.items():
        new = map_official_key(key)
        assert new in ours, f"{key} -> {new} is not a model key"
        fused[new] = fused.get(new, 0) + int(torch.Size(shape).numel())
    assert set(fused) == set(ours), f"model keys without an official source: {set(ours) - set(fused)}"
    for new, numel in fused.items():
        assert numel == ours[new].numel(), new


def test_convert_official_cli_roundtrip(reference_dir, tmp_path):
    src = reference_dir / "parity_tiny_eva" / "checkpoint.pt"
    dst = tmp_path / "native.pt"
    subprocess.run([sys.executable, "-m", "s4v.cli.main", "convert-official", str(src), str(dst),
                    "--num-frames", "4", "--backbone-heads", "2"], check=True, capture_output=True)
    io = _io(reference_dir, "eva")
    with torch.no_grad():
        assert (load_model(dst)(io["video"]) - io["logits"]).abs().max() < 2e-6


def test_side_only_export_plus_backbone_file(reference_dir, tmp_path):
    model = s4v.load_official(reference_dir / "parity_tiny_clip" / "checkpoint.pt", 4, backbone_heads=2)
    save_model(model, tmp_path / "side.pt", include_backbone=False)
    torch.save({"state_dict": {"visual." + k: v for k, v in model.backbone.tower.state_dict().items()}},
               tmp_path / "tower.pt")  # open_clip's checkpoint layout
    assert not any(k.startswith("backbone.") for k in torch.load(tmp_path / "side.pt")["state_dict"])
    with pytest.raises(ValueError, match="pass the backbone weights file"):
        load_model(tmp_path / "side.pt")
    again = load_model(tmp_path / "side.pt", pretrained=tmp_path / "tower.pt")
    io = _io(reference_dir, "clip")
    with torch.no_grad():
        assert torch.equal(again(io["video"]), model(io["video"]))


def test_pretrained_backbone_formats_and_errors(tmp_path):
    torch.manual_seed(0)
    src = s4v.create_model("s4v_tiny", 3, 4)
    tower_sd = src.backbone.tower.state_dict()
    # open_clip full-model file: text tower keys and the unused ln_post/proj are tolerated
    full = {"visual." + k: v for k, v in tower_sd.items()}
    full.update({"visual.ln_post.weight": torch.ones(64), "visual.proj": torch.zeros(64, 64),
                 "token_embedding.weight": torch.zeros(10, 8)})
    torch.save(full, tmp_path / "open_clip.bin")
    model = s4v.create_model("s4v_tiny", 3, 4, pretrained=tmp_path / "open_clip.bin")
    assert all(torch.equal(model.backbone.tower.state_dict()[k], v) for k, v in tower_sd.items())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    # an OpenAI-style TorchScript archive
    torch.jit.save(torch.jit.script(_Holder(full)), str(tmp_path / "openai.pt"))
    model = s4v.create_model("s4v_tiny", 3, 4, pretrained=tmp_path / "openai.pt")
    assert all(torch.equal(model.backbone.tower.state_dict()[k], v) for k, v in tower_sd.items())
    # a checkpoint of another size: clear error naming the mismatch
    with pytest.raises(ValueError, match="shape mismatch"):
        s4v.create_model("s4v_tiny", 3, 4, side_width=64, **{"backbone.width": 128, "backbone.heads": 4},
                         pretrained=tmp_path / "open_clip.bin")
    with pytest.raises(FileNotFoundError, match="not found"):
        s4v.create_model("s4v_tiny", 3, 4, pretrained=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing"):
        torch.save({"visual.conv1.weight": tower_sd["conv1.weight"]}, tmp_path / "partial.pt")
        s4v.create_model("s4v_tiny", 3, 4, pretrained=tmp_path / "partial.pt")


class _Holder(torch.nn.Module):
    """A TorchScript module whose state_dict has the given (dotted) keys, like OpenAI's archives."""

    def __init__(self, sd):
        super().__init__()
        for key, value in sd.items():
            *path, leaf = key.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            mod.register_buffer(leaf, value.clone())

    def forward(self) -> int:
        return 0
