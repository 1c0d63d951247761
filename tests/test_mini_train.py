"""diffprobe-mini's tokenizer, losses and training loop (tiny architecture, a few steps)."""

import json

import numpy as np
import pytest
import torch

from diffprobe.backbones import load_backbone
from diffprobe.data.world import render_scene, scene_seed, vocabulary
from diffprobe.errors import DiffprobeError
from diffprobe.mini import models
from diffprobe.mini.dataset import to_unit, tokenize
from diffprobe.mini.tokenizer import load_tokenizer, write_tokenizer
from diffprobe.mini.train import TrainConfig, denoising_loss, train_mini, vae_loss

TINY = models.MiniArch(vae_channels=(8, 16), unet_channels=(16, 16, 32, 32), unet_head_dim=8, text_dim=32,
                       text_layers=1, text_heads=2)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok"), vocabulary(), 24))


def test_every_world_word_is_one_token_and_other_text_still_tokenizes(tokenizer):
    for word in vocabulary():
        ids = tokenizer(word).input_ids
        assert len(ids) == 3 and tokenizer.convert_ids_to_tokens(ids[1]) == word + "</w>", word
    caption = render_scene(scene_seed("test", 3)).caption
    ids = tokenizer(caption).input_ids
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<|startoftext|>" and len(ids) == len(caption.split()) + 2
    other = tokenizer("Zebra 42!").input_ids
    assert tokenizer.decode(other, skip_special_tokens=True).replace(" ", "") == "zebra42!"
    padded = tokenize(tokenizer, ["a red circle", ""])
    assert padded.shape == (2, 24) and (padded[1, 2:] == tokenizer.eos_token_id).all()


def test_one_training_step_lowers_the_loss_on_a_fixed_batch(tokenizer):
    torch.manual_seed(0)
    unet, text = models.build_unet(TINY), models.build_text_encoder(TINY, vocabulary())
    sched = models.build_scheduler()
    scenes = [render_scene(scene_seed("train", i)) for i in range(4)]
    lat = torch.randn(4, 4, 32, 32)
    ids = tokenize(tokenizer, [s.caption for s in scenes])
    noise, t = torch.randn_like(lat), torch.tensor([10, 200, 500, 900])
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = denoising_loss(unet, text, sched, lat, ids, noise, t)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = denoising_loss(unet, text, sched, lat, ids, noise, t)
    assert after < before
    assert all(p.grad is not None for p in text.get_input_embeddings().parameters())  # text encoder learns too

    vae = models.build_vae(TINY)
    x = to_unit(torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2))
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    rec0, loss = vae_loss(vae, x, torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    with torch.no_grad():
        rec1, _ = vae_loss(vae, x, torch.Generator().manual_seed(0))
    assert rec1 < rec0


def test_config_rejects_bad_values():
    with pytest.raises(DiffprobeError, match="unknown"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(DiffprobeError, match="batch"):
        TrainConfig.from_dict({"batch": 0})
    with pytest.raises(DiffprobeError):
        TrainConfig.from_dict({"caption_dropout": 1.5})


@pytest.mark.slow
def test_resumed_training_equals_uninterrupted_and_exports_a_loadable_pipeline(tmp_path):
    cfg = dict(images=8, vae_steps=2, vae_batch=2, unet_steps=4, batch=2, checkpoint_every=1, samples=0, warmup=2)
    full = train_mini(TrainConfig(**cfg), tmp_path / "a", tmp_path / "pipe_a", arch=TINY)
    train_mini(TrainConfig(**{**cfg, "unet_steps": 2}), tmp_path / "b", tmp_path / "pipe_b", arch=TINY)
    resumed = train_mini(TrainConfig(**cfg), tmp_path / "b", tmp_path / "pipe_b", arch=TINY)
    la = json.loads((tmp_path / "pipe_a" / "losses.json").read_text())
    lb = json.loads((tmp_path / "pipe_b" / "losses.json").read_text())
    assert len(la["unet"]) == len(lb["unet"]) == 4 and resumed["unet_steps_done"] == 4
    np.testing.assert_allclose(la["unet"], lb["unet"], rtol=1e-5)
    np.testing.assert_allclose(la["unet token grounding"], lb["unet token grounding"], rtol=1e-5)
    np.testing.assert_allclose(la["vae"], lb["vae"], rtol=1e-5)
    bb = load_backbone({"name": "mini", "path": str(tmp_path / "pipe_b")})
    assert bb.vae_factor == 2 and bb.sample_size == 64 and bb.max_tokens == 24
    assert bb.latent_scale == pytest.approx(full["scaling_factor"]) and bb.latent_scale != 1.0
    with pytest.raises(DiffprobeError, match="does not fit"):  # another architecture in the same work_dir
        train_mini(TrainConfig(**{**cfg, "unet_steps": 5}), tmp_path / "b", tmp_path / "pipe_c",
                   arch=models.MiniArch(**{**TINY.to_dict(), "unet_channels": (16, 32, 32, 32)}))
    for name in ("loss_curve.png", "training_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (tmp_path / "pipe_b" / name).is_file()


@pytest.mark.slow
def test_training_continues_from_a_pipeline_on_closeups(tmp_path):
    from diffprobe.mini.dataset import is_closeup, render_training_scene

    assert [is_closeup(i, 0.35) for i in range(200)].count(True) in range(65, 75)  # spread evenly, 35 %
    closeup = render_training_scene(next(i for i in range(20) if is_closeup(i, 0.35)), 64, 0, "train", 0.35)
    assert len(closeup.objects) == 1
    base = dict(images=8, vae_steps=2, vae_batch=2, unet_steps=2, batch=2, checkpoint_every=1, samples=0, warmup=1)
    first = train_mini(TrainConfig(**base), tmp_path / "a", tmp_path / "pipe_a", arch=TINY)
    more = train_mini(TrainConfig(**{**base, "init_from": str(tmp_path / "pipe_a"), "closeup_fraction": 0.5,
                                     "unet_steps": 2}), tmp_path / "b", tmp_path / "pipe_b", arch=TINY)
    assert more["vae_steps_done"] == 0 and more["scaling_factor"] == pytest.approx(first["scaling_factor"])
    assert more["continued_from"]["unet_steps_done"] == 2  # the earlier run's record is kept
    a = load_backbone({"name": "a", "path": str(tmp_path / "pipe_a")})
    b = load_backbone({"name": "b", "path": str(tmp_path / "pipe_b")})
    va, vb = dict(a.vae.named_parameters()), dict(b.vae.named_parameters())
    assert all(torch.equal(va[k], vb[k]) for k in va)  # the VAE is kept as it was
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.unet.parameters(), b.unet.parameters()))
    with pytest.raises(DiffprobeError, match="not a diffprobe-mini pipeline"):
        train_mini(TrainConfig(**{**base, "init_from": str(tmp_path)}), tmp_path / "c", tmp_path / "pipe_c", arch=TINY)
