"""Text-video retrieval: metrics (ties included), WTI against a direct loop, the zero-init property,
loading both towers from one CLIP checkpoint, captions, the global contrastive loss and configs."""
import math

import pytest
import torch

import s4v
from s4v.eval.retrieval import ranks_of, retrieval_metrics
from s4v.model.retrieval import load_retrieval_model, save_retrieval_model, tokenize
from s4v.model.wti import TokenInteraction, score_in_blocks, token_wise_score

# ------------------------------------------------------------------------------------------- metrics


def test_metrics_square_hand_computed():
    sim = torch.tensor([[0.9, 0.1, 0.0],   # text 0: video 0 first -> rank 1
                        [0.8, 0.5, 0.1],   # text 1: video 1 second -> rank 2
                        [0.7, 0.6, 0.2]])  # text 2: video 2 third -> rank 3
    m = retrieval_metrics(sim)
    assert m["t2v_r1"] == pytest.approx(100 / 3) and m["t2v_r5"] == 100.0 and m["t2v_r10"] == 100.0
    assert m["t2v_medr"] == 2.0 and m["t2v_meanr"] == 2.0
    # V2T on sim.T: video 0 -> texts (0.9, 0.8, 0.7): rank 1; video 1 -> (0.1, 0.5, 0.6): rank 2;
    # video 2 -> (0.0, 0.1, 0.2): rank 1.
    assert m["v2t_r1"] == pytest.approx(200 / 3) and m["v2t_medr"] == 1.0
    assert m["v2t_meanr"] == pytest.approx(4 / 3)
    assert m["num_texts"] == 3 and m["num_videos"] == 3


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    sim = torch.tensor([[1.0, 0.0], [1.0, 0.5]])  # ranks 1 and 2
    assert retrieval_metrics(sim)["t2v_medr"] == 1.5


def test_ties_policies():
    sim = torch.tensor([[0.5, 0.5, 0.5, 0.1]])  # correct = column 0, tied with 2 others
    target = torch.tensor([0])
    assert ranks_of(sim, target, "pessimistic").item() == 3.0
    assert ranks_of(sim, target, "optimistic").item() == 1.0
    assert ranks_of(sim, target, "mean").item() == 2.0
    # A collapsed model (constant similarities) must not look good under the default policy.
    m = retrieval_metrics(torch.zeros(10, 10))
    assert m["t2v_r1"] == 0.0 and m["t2v_medr"] == 10.0 and m["v2t_r1"] == 0.0
    assert retrieval_metrics(torch.zeros(10, 10), ties="optimistic")["t2v_r1"] == 100.0
    assert retrieval_metrics(torch.zeros(10, 10), ties="mean")["t2v_meanr"] == 5.5
    with pytest.raises(ValueError, match="ties"):
        ranks_of(sim, target, "random")


def test_nan_scores_rank_last():
    sim = torch.tensor([[float("nan"), 0.2], [0.1, 0.3]])
    m = retrieval_metrics(sim)
    assert m["t2v_meanr"] == 1.5  # text 0's NaN counts as -inf: rank 2; text 1: rank 1


def test_multi_caption_protocol():
    # 3 videos; captions: video 0 has texts 0,1; video 1 has text 2; video 2 has texts 3,4,5.
    owner = torch.tensor([0, 0, 1, 2, 2, 2])
    sim = torch.tensor([
        [0.9, 0.2, 0.1],  # t0 (v0): rank 1
        [0.3, 0.4, 0.1],  # t1 (v0): rank 2
        [0.1, 0.8, 0.9],  # t2 (v1): rank 2
        [0.5, 0.1, 0.4],  # t3 (v2): rank 2
        [0.0, 0.0, 0.2],  # t4 (v2): rank 1
        [0.6, 0.7, 0.1],  # t5 (v2): rank 3
    ])
    m = retrieval_metrics(sim, owner)
    assert m["num_texts"] == 6 and m["num_videos"] == 3
    assert m["t2v_r1"] == pytest.approx(100 * 2 / 6) and m["t2v_meanr"] == pytest.approx(11 / 6)
    # V2T: group score = best caption of each video for the query video.
    # query v0: groups (v0: max(.9,.3)=.9, v1: .1, v2: max(.5,0,.6)=.6) -> rank 1
    # query v1: groups (v0: max(.2,.4)=.4, v1: .8, v2: max(.1,0,.7)=.7) -> rank 1
    # query v2: groups (v0: .1, v1: .9, v2: max(.4,.2,.1)=.4) -> rank 2
    assert m["v2t_r1"] == pytest.approx(200 / 3) and m["v2t_meanr"] == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="text_to_video"):
        retrieval_metrics(sim)


def test_video_without_captions_is_only_a_t2v_candidate():
    sim = torch.tensor([[0.9, 0.1, 0.95]])  # 1 text (video 0); video 2 has no caption but scores higher
    m = retrieval_metrics(sim, torch.tensor([0]))
    assert m["t2v_r1"] == 0.0 and m["t2v_meanr"] == 2.0
    assert m["v2t_r1"] == 100.0  # one V2T query (video 0) against one group


# ----------------------------------------------------------------------------------------------- WTI


def _random_embeddings(a=3, b=4, length=6, frames=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    inter = TokenInteraction(dim, "wti")
    with torch.no_grad():
        for p in inter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    tokens = torch.randn(a, length, dim, generator=g)
    lengths = torch.tensor([2, length, 4])[:a]
    mask = torch.arange(length)[None] < lengths[:, None]
    frames_ = torch.randn(b, frames, dim, generator=g)
    return inter, tokens, mask, frames_


def test_wti_matches_a_direct_loop():
    inter, tokens, mask, frames = _random_embeddings()
    t = inter.prepare_text(tokens, mask, mask.sum(1) - 1)
    v = inter.prepare_video(frames)
    fast = token_wise_score(t, v)
    wt_fc, wv_fc = inter.text_weight_fc, inter.video_weight_fc
    slow = torch.zeros(tokens.shape[0], frames.shape[0])
    for a in range(tokens.shape[0]):
        valid = [i for i in range(tokens.shape[1]) if mask[a, i]]
        wt = torch.softmax(torch.stack([wt_fc(tokens[a, i])[0] for i in valid]), 0)
        for b in range(frames.shape[0]):
            wv = torch.softmax(torch.stack([wv_fc(frames[b, j])[0] for j in range(frames.shape[1])]), 0)
            s = [[(torch.nn.functional.normalize(tokens[a, i], dim=0) @ torch.nn.functional.normalize(frames[b, j], dim=0)).item()
                  if mask[a, i] else 0.0 for j in range(frames.shape[1])] for i in range(tokens.shape[1])]
            t2v = sum(wt[k].item() * max(s[i]) for k, i in enumerate(valid))
            v2t = sum(wv[j].item() * max(s[i][j] for i in range(tokens.shape[1])) for j in range(frames.shape[1]))
            slow[a, b] = (t2v + v2t) / 2
    assert torch.allclose(fast, slow, atol=1e-5)


def test_blocked_scores_equal_the_full_matrix_and_mean_mode_is_cosine():
    inter, tokens, mask, frames = _random_embeddings(a=3, b=7)
    t, v = inter.prepare_text(tokens, mask, mask.sum(1) - 1), inter.prepare_video(frames)
    assert torch.allclose(score_in_blocks(t, v, block_texts=2, block_videos=3), token_wise_score(t, v), atol=1e-6)
    assert torch.allclose(score_in_blocks(t, v, 2, 3, rows=range(1, 3, 1)), token_wise_score(t, v)[1:3], atol=1e-6)
    mean = TokenInteraction(8, "mean")
    eot = mask.sum(1) - 1
    tm, vm = mean.prepare_text(tokens, mask, eot), mean.prepare_video(frames)
    e = torch.nn.functional.normalize(tokens[torch.arange(3), eot], dim=-1)
    f = torch.nn.functional.normalize(torch.nn.functional.normalize(frames, dim=-1).mean(1), dim=-1)
    assert torch.allclose(token_wise_score(tm, vm), e @ f.T, atol=1e-6)


# --------------------------------------------------------------------------------------------- model


def _tiny_clip_checkpoint(path):
    """An open_clip CLIP with s4v_retrieval_tiny's sizes (random weights), saved as a checkpoint file."""
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.model.CLIP(
        embed_dim=64, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2), quick_gelu=True).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(50.0))
    torch.save(clip.state_dict(), path)
    return clip


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    return path, _tiny_clip_checkpoint(path)


def test_zero_init_video_embeddings_are_frozen_clip_frames_and_text_is_clip_text(clip_file):
    path, clip = clip_file
    model = s4v.create_model("s4v_retrieval_tiny", num_frames=4, pretrained=path)
    model.train()  # BN in training mode too: the zero side_proj still hides the side network
    video = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        frames = model.encode_video(video)
        ref = clip.encode_image(video.flatten(0, 1)).view(2, 4, -1)
    assert frames.shape == (2, 4, 64)
    assert torch.allclose(frames, ref, atol=1e-5), (frames - ref).abs().max()
    ids = tokenize(["a red square moves left and a blue disc moves up", "a cat"], 32)
    with torch.no_grad():
        tokens, mask = model.encode_text(ids)
        eot = tokens[torch.arange(2), ids.argmax(-1)]
        ref_t = clip.encode_text(tokenize(["a red square moves left and a blue disc moves up", "a cat"], 77))
    assert torch.allclose(eot, ref_t, atol=1e-5)
    assert mask.sum(1).tolist() == [(ids[0] != 0).sum().item(), 4]
    assert model.temperature().item() == pytest.approx(50.0, rel=1e-5)  # from the checkpoint
    # the side network does matter once side_proj is non-zero
    with torch.no_grad():
        model.video_head.side_proj.normal_()
        assert not torch.allclose(model.encode_video(video), ref, atol=1e-3)


def test_frozen_parts_and_trainable_groups(clip_file):
    model = s4v.create_model("s4v_retrieval_tiny", num_frames=4, pretrained=clip_file[0])
    assert not any(p.requires_grad for p in model.backbone.parameters())
    names = set(model.trainable_modules())
    assert names == {"side", "video_head", "interaction", "visual_proj", "temperature", "text"}
    frozen = s4v.create_model("s4v_retrieval_tiny", num_frames=4, freeze_text=True)
    assert "text" not in frozen.trainable_modules() and not any(p.requires_grad for p in frozen.text.parameters())
    assert not model.video_head.side_proj.any()
    from s4v.train.tasks import retrieval_param_groups

    groups = retrieval_param_groups(model, 1e-4, 1e-7, 0.2, True)
    by_lr = {}
    for g in groups:
        by_lr.setdefault(g["lr"], 0)
        by_lr[g["lr"]] += sum(p.numel() for p in g["params"])
    side = sum(p.numel() for m in (model.side, model.video_head, model.interaction) for p in m.parameters())
    assert by_lr[1e-4] == side
    assert by_lr[1e-7] == sum(p.numel() for p in model.trainable_parameters()) - side
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.ndim == 1 for p in g["params"]))


def test_temperature_is_capped():
    model = s4v.create_model("s4v_retrieval_tiny", num_frames=4, max_temperature=100.0)
    with torch.no_grad():
        model.temperature.logit_scale.fill_(10.0)
    assert model.temperature().item() == pytest.approx(100.0)


def test_forward_backward_and_model_file_roundtrip(tmp_path, clip_file):
    torch.manual_seed(0)
    model = s4v.create_model("s4v_retrieval_tiny", num_frames=4, pretrained=clip_file[0])
    with torch.no_grad():
        model.video_head.side_proj.normal_(std=0.1)
    video = torch.randn(3, 4, 3, 32, 32)
    ids = tokenize(["a", "b c", "d e f"], 8)
    logits = model(video, ids)
    assert logits.shape == (3, 3)
    logits.diag().sum().backward()
    assert model.video_head.side_proj.grad is not None and model.side.stem.conv.weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())
    model.eval()
    path = tmp_path / "r.pt"
    save_retrieval_model(model, path)
    with pytest.raises(ValueError, match="pretrained"):
        load_retrieval_model(path)
    again = load_retrieval_model(path, pretrained=clip_file[0])
    with torch.no_grad():
        assert torch.allclose(again(video, ids), model(video, ids), atol=1e-5)


def test_every_retrieval_model_builds_on_meta():
    for name in ("s4v_retrieval_b32", "s4v_retrieval_b16", "s4v_retrieval_l14", "s4v_retrieval_e14"):
        model = s4v.create_model(name, device="meta")
        assert model.num_frames == 12 and model.spec.side.width == 320
        assert model.backbone.taps[-1] == model.spec.backbone.layers - 1
    e14 = s4v.create_model("s4v_retrieval_e14", device="meta")
    assert len(e14.side.blocks) == 32 and e14.video_head.bn is not None and e14.visual_proj.head is not None
    assert e14.interaction.text_weight_fc[0].in_features == 1024
    with pytest.raises(ValueError, match="did you mean 's4v_retrieval_b16'"):
        s4v.create_model("s4v_retrieval_b61")
    assert "s4v_retrieval_tiny" in s4v.list_models()


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, clip_file):
    sd = torch.load(clip_file[0])
    del sd["text_projection"]
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="text tower weights"):
        s4v.create_model("s4v_retrieval_tiny", num_frames=4, pretrained=bad)


# ------------------------------------------------------------------------------------------ training


def test_contrastive_loss_ignores_invalid_pairs():
    from s4v.train.tasks import contrastive_loss

    logits = torch.tensor([[5.0, 1.0, 9.0], [0.0, 3.0, 9.0], [9.0, 9.0, 9.0]])
    valid = torch.tensor([True, True, False])
    sub = logits[:2, :2]
    expected = (torch.nn.functional.cross_entropy(sub, torch.arange(2))
                + torch.nn.functional.cross_entropy(sub.T, torch.arange(2))) / 2
    assert contrastive_loss(logits, valid).item() == pytest.approx(expected.item())
    assert contrastive_loss(logits, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_caption_bank_cycles_every_caption(tmp_path):
    from s4v.data.captions import CaptionBank

    bank = CaptionBank({"a": ["x", "y", "z"], "b": ["only"], "c": []})
    seen = [bank.pick_one("a", e, seed=3) for e in range(6)]
    assert sorted(seen[:3]) == ["x", "y", "z"] and seen[3:] == seen[:3]
    assert bank.pick(["b", "c"], 5) == ["only", ""]
    assert bank.pick_one("a", 1, seed=3, mode="random") == bank.pick_one("a", 1, seed=3, mode="random")


def test_retrieval_config_validation():
    from s4v.config import ConfigError
    from s4v.experiment import load_experiment

    base = ["task=retrieval", "model.name=s4v_retrieval_tiny", "model.num_frames=4", "data.num_frames=4",
            "data.image_size=32"]
    cfg = load_experiment(None, base + ["retrieval.interaction=mean", "model.overrides={text.layers: 1}"])
    assert cfg.retrieval.interaction == "mean" and cfg.retrieval.max_words == 32
    with pytest.raises(ConfigError, match="set task: retrieval"):
        load_experiment(None, base[1:])
    with pytest.raises(ConfigError, match="needs a retrieval model"):
        load_experiment(None, ["task=retrieval", "model.name=s4v_tiny", "data.image_size=32"])
    with pytest.raises(ConfigError, match="repeated_aug"):
        load_experiment(None, base + ["data.repeated_aug=2"])
    with pytest.raises(ConfigError, match="text.layers"):
        load_experiment(None, base + ["model.overrides={text.layer: 1}"])


def test_retrieval_side_position_embedding_covers_the_cls_prompt():
    """Spec 5.1: in retrieval the side position embedding has N+1 rows and is added to every token."""
    import s4v
    from s4v.model.side_net import _prompted

    model = s4v.create_model("s4v_retrieval_b16", num_frames=12, device="meta")
    assert model.side.pos_embed.shape == (197, 320)
    rec = s4v.create_model("s4v_b16", 174, 8, device="meta")
    assert rec.side.pos_embed.shape == (196, 320)
    c, s, p = torch.randn(2, 1, 4), torch.randn(2, 3, 4), torch.randn(4, 4)
    assert torch.equal(_prompted(c, s, p), torch.cat([c, s], 1) + p)
    assert torch.equal(_prompted(c, s, p[1:]), torch.cat([c, s + p[1:]], 1))


# --------------------------------------------------------------------- EVA02-CLIP official layout
# The names of EVA-CLIP's own checkpoints (`eva_clip.model.CustomCLIP`: `visual.*` = the EVA vision tower,
# `text.*` = its `TextTransformer`), as written in baaivision/EVA `eva_clip/transformer.py`.
EVA_CLIP_TEXT_TOP = ["token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                     "text_projection"]
EVA_CLIP_TEXT_BLOCK = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
                       "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
                       "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]


def _eva_clip_text_shapes(width, layers, embed, context=77, vocab=49408):
    shapes = {"token_embedding.weight": (vocab, width), "positional_embedding": (context, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, embed)}
    block = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
             "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width),
             "attn.out_proj.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
             "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
             "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,)}
    for i in range(layers):
        shapes.update({f"transformer.resblocks.{i}.{k}": s for k, s in block.items()})
    return shapes


def _eva_clip_text_reference(sd, ids, layers, heads):
    """EVA-CLIP's text forward written out: pre-LN blocks, causal attention, exact GELU, ln_final, and
    the projection applied to every token (as the retrieval model uses them)."""
    F = torch.nn.functional
    t = lambda k: sd["text." + k]  # noqa: E731
    n, L = ids.shape
    x = t("token_embedding.weight")[ids] + t("positional_embedding")[:L]
    width = x.shape[-1]
    mask = torch.full((L, L), float("-inf"), dtype=x.dtype).triu(1)
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), t(p + "ln_1.weight"), t(p + "ln_1.bias"), 1e-5)
        q, k, v = F.linear(h, t(p + "attn.in_proj_weight"), t(p + "attn.in_proj_bias")).chunk(3, -1)
        q, k, v = (z.view(n, L, heads, -1).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask, -1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(n, L, width), t(p + "attn.out_proj.weight"),
                         t(p + "attn.out_proj.bias"))
        h = F.layer_norm(x, (width,), t(p + "ln_2.weight"), t(p + "ln_2.bias"), 1e-5)
        x = x + F.linear(F.gelu(F.linear(h, t(p + "mlp.c_fc.weight"), t(p + "mlp.c_fc.bias"))),
                         t(p + "mlp.c_proj.weight"), t(p + "mlp.c_proj.bias"))
    x = F.layer_norm(x, (width,), t("ln_final.weight"), t("ln_final.bias"), 1e-5)
    return x @ t("text_projection")


def test_eva_clip_official_layout_loads_both_towers(tmp_path):
    """An EVA02-CLIP checkpoint as EVA-CLIP writes it (`visual.*` EVA tower with norm/head, `text.*`,
    `logit_scale`) loads into the EVA retrieval model: the text features equal EVA-CLIP's text forward
    written out, and at init the frame embeddings are the tower's `head(norm(CLS))`."""
    from s4v.model.retrieval_specs import get_retrieval_spec

    spec = get_retrieval_spec("s4v_retrieval_tiny_eva")
    fresh = s4v.create_model("s4v_retrieval_tiny_eva", num_frames=4)
    tower = {**fresh.backbone.tower.state_dict(),  # the tower without its final norm/head, then those
             **fresh.visual_proj.state_dict()}
    assert {"norm.weight", "norm.bias", "head.weight", "head.bias"} <= set(tower)
    gen = torch.Generator().manual_seed(0)
    sd = {f"visual.{k}": torch.randn(v.shape, generator=gen) * 0.05 for k, v in tower.items()}
    shapes = _eva_clip_text_shapes(spec.text.width, spec.text.layers, spec.embed_dim)
    assert set(shapes) == set(EVA_CLIP_TEXT_TOP) | {f"transformer.resblocks.{i}.{k}" for i in range(2)
                                                      for k in EVA_CLIP_TEXT_BLOCK}
    sd.update({f"text.{k}": torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items()})
    sd["logit_scale"] = torch.tensor(math.log(30.0))
    path = tmp_path / "EVA02_CLIP_tiny.pt"
    torch.save(sd, path)

    model = s4v.create_model("s4v_retrieval_tiny_eva", num_frames=4, pretrained=path).double().eval()
    ids = tokenize(["a red square moves left and a blue disc moves up", "a cat"], 32)
    with torch.no_grad():
        tokens, _ = model.encode_text(ids)
    ref = _eva_clip_text_reference({k: v.double() for k, v in sd.items()}, ids, spec.text.layers, spec.text.heads)
    assert torch.allclose(tokens, ref, atol=1e-10), (tokens - ref).abs().max()
    assert model.temperature().item() == pytest.approx(30.0, rel=1e-6)
    video = torch.randn(1, 4, 3, 32, 32, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        frames = model.encode_video(video)
        feats = model.backbone.tower.forward_features(video.flatten(0, 1))
    cls = torch.nn.functional.layer_norm(feats[:, 0], (feats.shape[-1],), sd["visual.norm.weight"].double(),
                                         sd["visual.norm.bias"].double(), model.visual_proj.norm.eps)
    want = torch.nn.functional.linear(cls, sd["visual.head.weight"].double(), sd["visual.head.bias"].double())
    assert torch.allclose(frames[0], want, atol=1e-10), (frames[0] - want).abs().max()
