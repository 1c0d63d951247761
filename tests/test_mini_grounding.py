"""Grounding regions of world scenes and the token loss, on planted attention whose answer is known."""

import numpy as np
import pytest
import torch

from diffprobe.data.world import render_scene, scene_seed, vocabulary
from diffprobe.data.world.vocab import CAPTION_PARTS, CLASS_ID, PART_IDS
from diffprobe.hooks import ProbeRegistry
from diffprobe.mini import grounding, models
from diffprobe.mini.dataset import tokenize
from diffprobe.mini.grounding import BOTTOM, TOP, region_fractions, scene_regions, token_loss, token_shares
from diffprobe.mini.tokenizer import load_tokenizer, write_tokenizer
from diffprobe.training.mini import grounded_losses


def test_scene_regions_name_what_the_caption_words_name():
    for i in range(20):
        scene = render_scene(scene_seed("train", i))
        regions, tokens = scene_regions(scene, 24)
        words = scene.caption.split()
        assert ((regions > 0) & (regions <= 3)).sum() == (scene.instance > 0).sum()
        assert (regions[scene.instance > 0] == scene.instance[scene.instance > 0]).all()
        assert (regions[scene.classes == CLASS_ID[scene.stuff[0]]] == TOP).all()
        assert (regions[scene.classes == CLASS_ID[scene.stuff[1]]] == BOTTOM).all()
        assert set(np.unique(regions)) <= {1, 2, 3, TOP, BOTTOM}
        for pos in np.nonzero(tokens)[0]:
            word, region = words[pos - 1], tokens[pos]
            if region == TOP:
                assert word == scene.stuff[0]
            elif region == BOTTOM:
                assert word == scene.stuff[1]
            else:
                obj = scene.objects[region - 1]
                assert word in (obj.colour, obj.category) and (regions == region).any()
        assert (tokens > 0).sum() == 2 * len(scene.objects) + 2  # colour + category per object, two stuff words


def test_a_closeups_part_words_are_grounded_on_their_parts():
    for i, category in enumerate(["face", "bird", "house"] * 3):
        scene = render_scene(scene_seed("train", i), first=category, closeup=True)
        regions, tokens = scene_regions(scene, 24)
        words = scene.caption.split()
        named = scene.words[0]["parts"]
        assert list(named) == [p for p in CAPTION_PARTS[category] if (scene.parts == PART_IDS[(category, p)]).any()]
        assert len(named) >= 2
        for part, index in named.items():
            assert words[index] == part and tokens[index + 1] == grounding.part_region(category, part)
        assert words[named[next(iter(named))] - 1] == "with"
        assert (tokens > 0).sum() == 2 + len(named) + 2  # colour, category, each part, two stuff words


def test_region_fractions_are_cell_coverage():
    regions = torch.zeros(1, 4, 4, dtype=torch.uint8)
    regions[0, :2, :2] = 1       # all of cell (0, 0) of a 2 x 2 grid
    regions[0, 2:, 2:3] = TOP    # half of cell (1, 1)
    regions[0, 2:, 3:] = BOTTOM  # the other half
    parts = torch.zeros(1, 4, 4, dtype=torch.uint8)
    parts[0, 0, 0] = PART_IDS[("face", "eye")]  # a quarter of cell (0, 0), inside object 1
    f = region_fractions(regions, parts, (2, 2))
    assert f.shape == (1, grounding.NUM_REGIONS, 4)
    assert f[0, 1].tolist() == [1, 0, 0, 0] and f[0, TOP].tolist() == [0, 0, 0, 0.5]
    assert f[0, BOTTOM].tolist() == [0, 0, 0, 0.5] and f[0, 0].tolist() == [0, 1, 1, 0]
    assert torch.allclose(f[:, :grounding.SCENE_REGIONS].sum(1), torch.ones(1, 4))  # the region map partitions
    eye = grounding.part_region("face", "eye")
    assert f[0, eye].tolist() == [0.25, 0, 0, 0] and f[0, grounding.SCENE_REGIONS:].sum() == 0.25


def test_token_share_and_loss_on_planted_attention():
    q, t = 4, 3
    fractions = torch.zeros(1, grounding.NUM_REGIONS, q)
    fractions[0, 1] = torch.tensor([1.0, 1.0, 0.0, 0.0])   # object 1 covers the first two cells
    fractions[0, 0] = 1 - fractions[0, 1]
    probs = torch.zeros(1, q, t)
    probs[0, :, 0] = 1.0                                   # token 0 (BOS) takes what the others leave
    probs[0, :2, 1], probs[0, :2, 0] = 0.5, 0.5            # token 1: all its mass inside object 1
    probs[0, :, 2] = 0.25                                  # token 2: spread evenly over the cells
    probs[0, :, 0] -= probs[0, :, 2]
    regions = torch.tensor([[0, 1, 1]])
    share = token_shares(probs, fractions, regions)
    assert torch.allclose(share, torch.tensor([[0.0, 1.0, 0.5]]))  # ungrounded BOS counts 0
    loss = token_loss(probs, fractions, regions, torch.tensor([1.0]))
    assert torch.isclose(loss, torch.tensor((0.0 + 0.5) / 2))
    assert torch.isclose(token_loss(probs, fractions, regions, torch.tensor([0.2])), 0.2 * loss)


def test_grounded_step_lowers_the_token_loss_through_captured_attention(tmp_path):
    arch = models.MiniArch(vae_channels=(8, 16), unet_channels=(16, 16, 32, 32), unet_head_dim=8, text_dim=32,
                           text_layers=1, text_heads=2)
    torch.manual_seed(0)
    unet, text = models.build_unet(arch), models.build_text_encoder(arch, vocabulary())
    sched = models.build_scheduler()
    tok = load_tokenizer(write_tokenizer(tmp_path, vocabulary(), 24))
    scenes = [render_scene(scene_seed("train", i)) for i in range(4)]
    ids = tokenize(tok, [s.caption for s in scenes])
    regions, tokens = zip(*(scene_regions(s, 24) for s in scenes))
    regions, tokens = torch.from_numpy(np.stack(regions)), torch.from_numpy(np.stack(tokens))
    parts = torch.from_numpy(np.stack([s.parts for s in scenes]))
    lat, t = torch.randn(4, 4, 32, 32), torch.tensor([10, 50, 100, 200])
    noise = torch.randn_like(lat)
    probe = ProbeRegistry(unet)
    opt = torch.optim.Adam(list(unet.parameters()) + list(text.parameters()), lr=3e-3)
    first = None
    for _ in range(8):
        losses = grounded_losses(unet, text, sched, probe, lat, ids, noise, t, regions, parts, tokens)
        first = first if first is not None else losses["tokens"].item()
        opt.zero_grad()
        losses["tokens"].backward()
        opt.step()
    assert losses["tokens"].item() < first
    assert not any(h for m in unet.modules() for h in m._forward_hooks.values())  # capture cleaned up


def _teacher_setup(tmp_path):
    """A tiny UNet, its AttentionTeacher and grounded_losses' arguments on two world scenes."""
    from diffprobe.mini.preserve import AttentionTeacher

    arch = models.MiniArch(vae_channels=(8, 16), unet_channels=(16, 16, 32, 32), unet_head_dim=8, text_dim=32,
                           text_layers=1, text_heads=2)
    torch.manual_seed(0)
    unet, text = models.build_unet(arch), models.build_text_encoder(arch, vocabulary())
    sched, tok = models.build_scheduler(), load_tokenizer(write_tokenizer(tmp_path, vocabulary(), 24))
    scenes = [render_scene(scene_seed("train", i)) for i in range(2)]
    ids = tokenize(tok, [s.caption for s in scenes])
    regions, tokens = zip(*(scene_regions(s, 24) for s in scenes))
    regions, tokens = torch.from_numpy(np.stack(regions)), torch.from_numpy(np.stack(tokens))
    parts = torch.from_numpy(np.stack([s.parts for s in scenes]))
    lat, t, noise = torch.randn(2, 4, 32, 32), torch.tensor([10, 300]), torch.randn(2, 4, 32, 32)
    teacher, probe = AttentionTeacher(unet), ProbeRegistry(unet)
    return teacher, (unet, text, sched, probe, lat, ids, noise, t, regions, parts, tokens), tok


def test_kept_self_attention_is_zero_for_the_loaded_model_and_pulls_a_changed_one_back(tmp_path):
    from diffprobe.mini.preserve import attention_kl

    p, q = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.25, 0.25, 0.5]])
    assert attention_kl(q, p).item() == pytest.approx(2 * 0.5 * np.log(0.5 / 0.25))  # KL(p || q) by hand
    teacher, args, _ = _teacher_setup(tmp_path)
    unet, probe = args[0], args[3]
    assert teacher.sites and all(probe.sites[n].kind == "self_attn" for n in teacher.sites)
    assert grounded_losses(*args, teacher)["self_attention"].item() == pytest.approx(0.0, abs=1e-6)
    attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    with torch.no_grad():
        attn.to_q.weight.mul_(8.0)  # sharper self-attention than the loaded model's
    kept = teacher.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.clone()
    opt = torch.optim.Adam([attn.to_q.weight], lr=3e-2)
    first = grounded_losses(*args, teacher)["self_attention"].item()
    for _ in range(10):
        loss = grounded_losses(*args, teacher)["self_attention"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 1e-3 and loss.item() < 0.5 * first
    assert torch.equal(teacher.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight, kept)


def test_self_attention_kept_at_diffsegs_call_is_the_kl_of_that_call_alone(tmp_path):
    from diffprobe.families import family_for
    from diffprobe.hooks import Reduce
    from diffprobe.mini.preserve import attention_kl, diffseg_call

    teacher, args, tok = _teacher_setup(tmp_path)
    unet, text, lat = args[0], args[1], args[4]
    empty = text(tokenize(tok, [""])).last_hidden_state[0].detach()
    call = diffseg_call(lat, empty)
    assert call[0] is lat and call[1].tolist() == [300, 300]  # clean latents, the timestep embedding alone
    assert torch.equal(call[2].context, empty.expand(2, -1, -1))
    with torch.no_grad():
        unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.mul_(8.0)
    got = grounded_losses(*args, teacher, call)["self_attention"].item()

    def maps(model):  # independently: capture each UNet's head-averaged self-attention on DiffSeg's call
        probe = ProbeRegistry(model)
        with torch.no_grad(), probe.capture(teacher.sites, reduce=Reduce(heads="mean")) as cache:
            family_for(model).denoise(model, *call)
        return {n: cache[n] for n in teacher.sites}

    student, target = maps(unet), maps(teacher.unet)
    want = torch.stack([attention_kl(student[n], target[n]) for n in teacher.sites]).mean().item()
    assert got == pytest.approx(want, rel=1e-5) and got > 1e-3
    assert got != pytest.approx(grounded_losses(*args, teacher)["self_attention"].item(), rel=1e-3)  # other inputs
