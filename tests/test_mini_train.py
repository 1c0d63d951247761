"""diffprobe-mini's tokenizer, losses and training loop (tiny architecture, a few steps)."""

import json

import numpy as np
import pytest
import torch

from diffprobe.loading import load_backbone
from diffprobe.data.world import render_scene, scene_seed, vocabulary
from diffprobe.errors import DiffprobeError
from diffprobe.mini import models
from diffprobe.mini.dataset import to_unit, tokenize
from diffprobe.mini.tokenizer import load_tokenizer, write_tokenizer
from diffprobe.training.mini import MiniTrainSettings, denoising_loss, train_mini, vae_loss

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


def test_adopting_a_larger_vocabulary_keeps_every_old_token_row_and_starts_new_ones_at_the_mean():
    from diffprobe.mini.tokenizer import build_vocab

    old_vocab, _ = build_vocab(["red", "face"])
    new_vocab, _ = build_vocab(["red", "eye", "face"])  # "eye" shifts the ids of "face"'s tokens and the specials
    text = models.build_text_encoder(TINY, ["red", "face"])
    old_rows = text.get_input_embeddings().weight.detach().clone()
    fresh = models.adopt_vocabulary(text, old_vocab, new_vocab)
    rows = text.get_input_embeddings().weight
    assert rows.shape == (len(new_vocab), TINY.text_dim) and text.config.vocab_size == len(new_vocab)
    assert fresh.tolist() == [t not in old_vocab for t in new_vocab]
    assert {t for t in new_vocab if t not in old_vocab} == {"ye</w>", "eye</w>"}  # planted: the new merges
    for token, i in new_vocab.items():
        expected = old_rows[old_vocab[token]] if token in old_vocab else old_rows.mean(0)
        assert torch.equal(rows[i], expected), token
    assert text.config.eos_token_id == new_vocab["<|endoftext|>"] != old_vocab["<|endoftext|>"]

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
        MiniTrainSettings.from_dict({"stepz": 3})
    with pytest.raises(DiffprobeError, match="batch"):
        MiniTrainSettings.from_dict({"batch": 0})
    with pytest.raises(DiffprobeError):
        MiniTrainSettings.from_dict({"caption_dropout": 1.5})
    with pytest.raises(DiffprobeError, match="new_word_lr_scale"):
        MiniTrainSettings.from_dict({"new_word_lr_scale": 0})
    with pytest.raises(DiffprobeError, match="top_attention"):
        MiniTrainSettings.from_dict({"top_attention": True, "denoiser": "pixart", "init_from": "packaged"})


def test_keeping_self_attention_needs_a_loaded_denoiser_of_the_trained_kind(tmp_path):
    with pytest.raises(DiffprobeError, match="keep_self_attention_at must be one of training, diffseg"):
        MiniTrainSettings.from_dict({"keep_self_attention": 1.0, "init_from": "packaged", "keep_self_attention_at": "t"})
    cfg = MiniTrainSettings.from_dict({"keep_self_attention": 1.0, "denoiser": "pixart", "init_from": "packaged"})
    with pytest.raises(DiffprobeError, match="keep_self_attention keeps a loaded transformer"):
        train_mini(cfg, tmp_path / "work", tmp_path / "out")  # packaged mini has a UNet, not a transformer
    assert not (tmp_path / "work").exists()  # refused before any work


def test_cached_scenes_and_latents_are_made_again_when_what_they_came_from_changes(tmp_path, tokenizer):
    from diffprobe.mini.dataset import training_set
    from diffprobe.training.mini import _encode_latents

    cache, latents = tmp_path / "data.safetensors", tmp_path / "latents.safetensors"
    seed0 = training_set(cache, 2, 64, tokenizer, base_seed=0)
    seed1 = training_set(cache, 2, 64, tokenizer, base_seed=1)  # same cache file, another seed
    assert torch.equal(seed1.images, training_set(tmp_path / "fresh.safetensors", 2, 64, tokenizer, 1).images)
    assert not torch.equal(seed0.images, seed1.images)
    torch.manual_seed(0)
    vae = models.build_vae(TINY)
    first = _encode_latents(vae, seed0.images, latents)
    assert torch.equal(_encode_latents(vae, seed0.images, latents), first)  # same images, same VAE: the cache
    other = _encode_latents(vae, seed1.images, latents)
    assert torch.allclose(other, _encode_latents(vae, seed1.images, tmp_path / "fresh_latents.safetensors"))
    assert not torch.allclose(other, first)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(2.0)  # another VAE: encoded again
    assert not torch.allclose(_encode_latents(vae, seed1.images, latents), other)


def test_grown_top_attention_leaves_the_output_unchanged_and_its_maps_learn_from_the_token_loss():
    from diffprobe.hooks import ProbeRegistry, Reduce
    from diffprobe.mini.grounding import region_fractions, token_loss

    torch.manual_seed(0)
    unet = models.build_unet(TINY)
    grown = models.grow_top_attention(unet)
    assert models.grow_top_attention(grown) is grown
    x, t, context = torch.randn(2, 4, 32, 32), torch.tensor([5, 700]), torch.randn(2, 24, TINY.text_dim)
    with torch.no_grad():
        assert torch.equal(unet(x, t, context).sample, grown(x, t, context).sample)
    probe = ProbeRegistry(grown)
    top = [n for n, s in probe.sites.items() if s.kind == "cross_attn" and s.divisor == 1]
    assert top == [f"up_blocks.3.attentions.{i}.transformer_blocks.0.attn2.hook_probs" for i in range(2)]
    regions = torch.zeros(2, 64, 64, dtype=torch.long)
    regions[:, :, :32] = 1  # token 1 names the left half
    token_regions = torch.zeros(2, 24, dtype=torch.long)
    token_regions[:, 1] = 1
    with probe.capture(top, reduce=Reduce(heads="mean"), grad=True) as cache:
        grown(x, t, context)
    loss = token_loss(cache[top[0]], region_fractions(regions, torch.zeros_like(regions), (32, 32)),
                      token_regions, torch.ones(2))
    loss.backward()
    block = grown.up_blocks[3].attentions[0].transformer_blocks[0]
    assert block.attn2.to_q.weight.grad.abs().sum() > 0 and block.attn2.to_k.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_resumed_training_equals_uninterrupted_and_exports_a_loadable_pipeline(tmp_path):
    cfg = dict(images=8, vae_steps=2, vae_batch=2, unet_steps=4, batch=2, checkpoint_every=1, samples=0, warmup=2)
    full = train_mini(MiniTrainSettings(**cfg), tmp_path / "a", tmp_path / "pipe_a", arch=TINY)
    train_mini(MiniTrainSettings(**{**cfg, "unet_steps": 2}), tmp_path / "b", tmp_path / "pipe_b", arch=TINY)
    resumed = train_mini(MiniTrainSettings(**cfg), tmp_path / "b", tmp_path / "pipe_b", arch=TINY)
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
        train_mini(MiniTrainSettings(**{**cfg, "unet_steps": 5}), tmp_path / "b", tmp_path / "pipe_c",
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
    first = train_mini(MiniTrainSettings(**base), tmp_path / "a", tmp_path / "pipe_a", arch=TINY)
    more = train_mini(MiniTrainSettings(**{**base, "init_from": str(tmp_path / "pipe_a"), "closeup_fraction": 0.5,
                                     "unet_steps": 2}), tmp_path / "b", tmp_path / "pipe_b", arch=TINY)
    assert more["vae_steps_done"] == 0 and more["scaling_factor"] == pytest.approx(first["scaling_factor"])
    assert more["continued_from"]["unet_steps_done"] == 2  # the earlier run's record is kept
    a = load_backbone({"name": "a", "path": str(tmp_path / "pipe_a")})
    b = load_backbone({"name": "b", "path": str(tmp_path / "pipe_b")})
    va, vb = dict(a.vae.named_parameters()), dict(b.vae.named_parameters())
    assert all(torch.equal(va[k], vb[k]) for k in va)  # the VAE is kept as it was
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.unet.parameters(), b.unet.parameters()))
    train_mini(MiniTrainSettings(**{**base, "init_from": str(tmp_path / "pipe_a"), "top_attention": True}),
               tmp_path / "g", tmp_path / "pipe_g", arch=TINY)
    grown = load_backbone({"name": "g", "path": str(tmp_path / "pipe_g")})
    assert grown.unet.config.up_block_types[-1] == "CrossAttnUpBlock2D"
    assert {s.divisor for s in grown.probe.sites.values() if s.kind == "cross_attn"} == {1, 2, 4, 8}
    train_mini(MiniTrainSettings(**{**base, "init_from": str(tmp_path / "pipe_a"), "top_attention": True,
                              "freeze_loaded": True, "lr": 1e-2}), tmp_path / "f", tmp_path / "pipe_f", arch=TINY)
    frozen = load_backbone({"name": "f", "path": str(tmp_path / "pipe_f")})
    loaded, kept = dict(a.unet.named_parameters()), dict(frozen.unet.named_parameters())
    new = [k for k in kept if k not in loaded]
    assert new and all(k.startswith("up_blocks.3.attentions.") for k in new)
    assert all(torch.equal(loaded[k], kept[k]) for k in loaded)  # every loaded weight exported bit-identical
    assert all(torch.equal(p, q) for p, q in zip(a.text_encoder.parameters(), frozen.text_encoder.parameters()))
    assert kept["up_blocks.3.attentions.0.proj_out.weight"].abs().sum() > 0  # the new level trained
    with pytest.raises(DiffprobeError, match="freeze_loaded"):
        MiniTrainSettings.from_dict({"freeze_loaded": True, "init_from": "packaged"})
    train_mini(MiniTrainSettings(**{**base, "init_from": str(tmp_path / "pipe_a"), "top_attention": True,
                              "keep_self_attention": 1.0}), tmp_path / "k", tmp_path / "pipe_k", arch=TINY)
    kl = json.loads((tmp_path / "pipe_k" / "losses.json").read_text())["unet self-attention KL to the loaded model"]
    assert len(kl) == 2 and kl[0] == pytest.approx(0.0, abs=1e-6)  # the first step's student is the loaded model
    with pytest.raises(DiffprobeError, match="keep_self_attention"):
        MiniTrainSettings.from_dict({"keep_self_attention": 1.0})
    with pytest.raises(DiffprobeError, match="not a diffprobe-mini pipeline"):
        train_mini(MiniTrainSettings(**{**base, "init_from": str(tmp_path)}), tmp_path / "c", tmp_path / "pipe_c", arch=TINY)
    (tmp_path / "pipe_a" / "tokenizer" / "vocab.json").unlink()  # its vocabulary is what new words are matched by
    with pytest.raises(DiffprobeError, match="not a diffprobe-mini pipeline"):
        train_mini(MiniTrainSettings(**{**base, "init_from": str(tmp_path / "pipe_a")}), tmp_path / "d", tmp_path / "pipe_d",
                   arch=TINY)


@pytest.mark.slow
def test_continuing_with_new_words_learns_only_their_embeddings_when_the_text_encoder_is_kept(tmp_path, monkeypatch):
    """A pipeline trained before the close-up part words existed: continuing it with train_text_encoder=false
    re-indexes its token embedding by token string, so old captions encode exactly as before, and trains only
    the new words' rows."""
    from diffprobe.data.world.vocab import CAPTION_PARTS
    from diffprobe.training import mini as train_module

    new_words = {p for names in CAPTION_PARTS.values() for p in names} | {"with"}
    old_words = [w for w in vocabulary() if w not in new_words]
    base = dict(images=8, vae_steps=2, vae_batch=2, unet_steps=2, batch=2, checkpoint_every=1, samples=0, warmup=1,
                closeup_fraction=0.0)
    monkeypatch.setattr(train_module, "vocabulary", lambda: old_words)  # ordinary scenes' captions use only these
    train_mini(MiniTrainSettings(**base), tmp_path / "a", tmp_path / "pipe_a", arch=TINY)
    monkeypatch.undo()
    train_mini(MiniTrainSettings(**{**base, "init_from": str(tmp_path / "pipe_a"), "closeup_fraction": 1.0, "lr": 1e-2,
                              "train_text_encoder": False}), tmp_path / "b", tmp_path / "pipe_b", arch=TINY)
    a = load_backbone({"name": "a", "path": str(tmp_path / "pipe_a")})
    b = load_backbone({"name": "b", "path": str(tmp_path / "pipe_b")})
    caption = render_scene(scene_seed("test", 0)).caption  # old words only
    with torch.no_grad():
        enc_a = a.text_encoder(tokenize(a.tokenizer, [caption])).last_hidden_state
        enc_b = b.text_encoder(tokenize(b.tokenizer, [caption])).last_hidden_state
    assert torch.equal(enc_a, enc_b)
    rows_a, rows_b = a.text_encoder.get_input_embeddings().weight, b.text_encoder.get_input_embeddings().weight
    vocab_a, vocab_b = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    assert rows_b.shape[0] == len(vocab_b) > rows_a.shape[0] == len(vocab_a)
    assert all(torch.equal(rows_a[i], rows_b[vocab_b[token]]) for token, i in vocab_a.items())  # old rows kept
    mean = rows_a.mean(0)
    moved = {w for w in new_words if not torch.allclose(rows_b[vocab_b[w + "</w>"]], mean)}
    assert "with" in moved and len(moved) >= 4  # "with" is in every close-up caption, each names >= 3 parts
    others_a = {k: v for k, v in a.text_encoder.named_parameters() if "token_embedding" not in k}
    others_b = dict(b.text_encoder.named_parameters())
    assert all(torch.equal(v, others_b[k]) for k, v in others_a.items())

