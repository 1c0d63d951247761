"""Backbones load offline through the real path; the drives (diffprobe.drives) call the denoiser at the right timesteps."""

import json

import pytest
import torch

from diffprobe.families.tiny import word_tokenizer
from diffprobe.loading import load_backbone, save_backbone, tiny_backbone
from diffprobe.config import ModelSettings
from diffprobe.errors import DiffprobeError
from diffprobe.hooks import BatchLayout, ProbeRegistry, Reduce
from diffprobe.drives import (
    encode_images, encode_prompt, generate, ddim_inversion, inversion_timesteps, unet_call, unet_step,
)


@pytest.mark.parametrize("structure", ["sd15", "sdxl"])
def test_saved_tiny_pipeline_loads_back_offline(tmp_path, structure, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = tiny_backbone(structure, seed=3)
    save_backbone(bb, tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["unet"][1] == "UNet2DConditionModel"
    assert not list((tmp_path / "pipe").rglob("*.bin"))  # safetensors only
    loaded = load_backbone(ModelSettings(name="saved", path=str(tmp_path / "pipe")))
    assert loaded.family.name == bb.family.name and loaded.latent_scale == bb.latent_scale
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    lat = encode_images(loaded, x)
    torch.testing.assert_close(lat, encode_images(bb, x))
    c1, c2 = encode_prompt(loaded, ["a cat"]), encode_prompt(bb, ["a cat"])
    torch.testing.assert_close(c1.context, c2.context)
    torch.testing.assert_close(unet_call(loaded, lat, 10, c1), unet_call(bb, lat, 10, c2))


def test_missing_and_pickled_weights_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(DiffprobeError, match="not a diffusers model directory.*model.path="):
        load_backbone(ModelSettings(name="x", path=str(tmp_path / "nowhere"), repo_id="org/model"))
    with pytest.raises(DiffprobeError, match="org/model.*not in the Hugging Face cache.*`hf download org/model`"):
        load_backbone(ModelSettings(name="x", repo_id="org/model"))
    bb = tiny_backbone("sd15")
    save_backbone(bb, tmp_path / "pipe")
    for f in (tmp_path / "pipe" / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))  # as if only pickled weights were there
    with pytest.raises(DiffprobeError, match="unet/.*safetensors"):
        load_backbone(ModelSettings(name="x", path=str(tmp_path / "pipe")))


def test_word_tokenizer_keeps_words_whole():
    tok = word_tokenizer(["cat", "house"], max_length=8)
    ids = tok(["a cat house"]).input_ids[0]
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "cat</w>", "house</w>", "<|endoftext|>"]


def test_unet_step_noise_follows_q_sample():
    """With noise, the UNet sees sqrt(a) x0 + sqrt(1-a) eps at the scheduler's alpha-bar of t."""
    bb = tiny_backbone("sd15")
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    seen = []
    handle = bb.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    cond = encode_prompt(bb, [""])
    unet_step(bb, x0, 300, cond, noise=eps)
    unet_step(bb, x0, 300, cond, noise=None)
    handle.remove()
    a = bb.scheduler.alphas_cumprod[300]
    torch.testing.assert_close(seen[0], a.sqrt() * x0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(seen[1], x0)


def test_ddim_inversion_timesteps_and_saved_steps():
    bb = tiny_backbone("sd15")
    assert inversion_timesteps(bb, 50) == [-1] + list(range(0, 961, 20))
    probe = ProbeRegistry(bb.unet)
    lat, cond = torch.randn(1, 4, 8, 8), encode_prompt(bb, [""])
    with probe.capture("mid_block.hook_out", reduce=Reduce(steps=[0, 4, 9])) as cache:
        z = ddim_inversion(bb, lat, cond, num_steps=50)
    assert z.shape == lat.shape and torch.isfinite(z).all()
    assert cache.timesteps == [-1.0] + [float(t) for t in range(0, 961, 20)]
    assert cache.kept_steps == [0, 4, 9] and cache["mid_block.hook_out"].shape[0] == 3


def test_ddim_inversion_follows_the_eta0_update():
    """Each call moves x from alpha-bar(t_call) to alpha-bar(t_next) along the predicted noise:
    x' = sqrt(a') (x - sqrt(1 - a) eps) / sqrt(a) + sqrt(1 - a') eps, with a = 1 for the t=-1 call."""
    bb = tiny_backbone("sd15")
    lat, cond = torch.randn(1, 4, 8, 8), encode_prompt(bb, [""])
    xs, eps = [], []
    pre = bb.unet.register_forward_pre_hook(lambda m, a: xs.append(a[0].clone()))
    post = bb.unet.register_forward_hook(lambda m, a, out: eps.append(out.sample.clone()))
    z = ddim_inversion(bb, lat, cond, num_steps=10)
    pre.remove(), post.remove()
    alphas = bb.scheduler.alphas_cumprod
    calls = inversion_timesteps(bb, 10)
    assert calls == [-1, 0, 100, 200, 300, 400, 500, 600, 700, 800] and torch.equal(xs[0], lat)
    targets = xs[1:] + [z]
    for i, t in enumerate(calls):
        a = torch.tensor(1.0) if t < 0 else alphas[t]
        a_next = alphas[i * 100]
        expected = a_next.sqrt() * (xs[i] - (1 - a).sqrt() * eps[i]) / a.sqrt() + (1 - a_next).sqrt() * eps[i]
        torch.testing.assert_close(targets[i], expected, atol=1e-5, rtol=1e-5)


def test_generate_runs_cfg_batch_and_is_deterministic():
    bb = tiny_backbone("sd15")
    probe = ProbeRegistry(bb.unet)
    batches = []
    handle = bb.unet.register_forward_pre_hook(lambda m, a, k: batches.append(a[0].shape[0]), with_kwargs=True)
    with probe.capture("*.attn2.hook_probs", layout=BatchLayout(cfg=True)) as cache:
        img1, _ = generate(bb, ["a cat"], num_steps=3, generator=torch.Generator().manual_seed(0))
    handle.remove()
    img2, _ = generate(bb, ["a cat"], num_steps=3, generator=torch.Generator().manual_seed(0))
    assert batches == [2, 2, 2] and cache[cache.names[0]].shape[0] == 1
    assert img1.shape == (1, 3, 64, 64) and torch.equal(img1, img2) and 0 <= img1.min() and img1.max() <= 1


def test_loads_from_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    """A repo in the HF cache layout (models--org--name/snapshots/<rev>, refs/main) loads by repo_id alone."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sd"
    rev = "0123456789abcdef0123456789abcdef01234567"
    save_backbone(tiny_backbone("sd15", seed=5), repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    bb = load_backbone(ModelSettings(name="cached", repo_id="someone/tiny-sd"))
    ref = tiny_backbone("sd15", seed=5)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(encode_images(bb, x), encode_images(ref, x))


@pytest.mark.parametrize("family", ["sd3", "auraflow"])
def test_an_image_beyond_the_position_tables_reach_is_refused_in_one_line(family):
    """SD3 and AuraFlow learn a table of patch positions: the largest image side they take is that table's reach
    (SD3-medium: 3072 px). Up to it a call runs; past it image_size is refused before anything runs (diffusers
    would raise from inside the forward)."""
    from diffprobe.drives import encode_prompt, unet_call
    from diffprobe.errors import DiffprobeError
    from diffprobe.loading import tiny_backbone

    bb = tiny_backbone(family)
    reach = bb.family.max_latent_side(bb.unet)
    limit = reach * bb.vae_factor
    assert bb.check_image_size(limit) == limit
    with torch.no_grad():
        out = unet_call(bb, torch.zeros(1, bb.unet.config.in_channels, reach, reach), 10,
                        encode_prompt(bb, [""], (limit, limit)))
    assert out.shape[-1] == reach
    step = bb.grid_factor * max(s.divisor for s in bb.probe.sites.values())
    with pytest.raises(DiffprobeError, match=rf"image_size {limit + step} is beyond .* reaches {limit} px"):
        bb.check_image_size(limit + step)
