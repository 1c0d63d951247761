"""DIFT: the reference's noise level, the block it reads, its ensemble and its seeding."""

import pytest
import torch
from PIL import Image

from diffprobe.errors import DiffprobeError
from diffprobe.heads.dift import DiftHead, DiftSettings, dift_describer
from diffprobe.loading import tiny_backbone
from diffprobe.runner import Item, run_heads


@pytest.fixture(scope="module")
def sd21():
    return tiny_backbone("sd21")


def test_the_noise_at_t_261_is_the_references_on_sd21s_schedule(sd21):
    """z_t = 0.80973 z + 0.58680 e (alpha-bar 0.6557), DDPM add_noise on SD 2.1's scaled-linear betas."""
    one, zero = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    assert float(sd21.family.noisy_latents(sd21, one, zero, 261)[0, 0, 0, 0]) == pytest.approx(0.80973, abs=1e-4)
    assert float(sd21.family.noisy_latents(sd21, zero, one, 261)[0, 0, 0, 0]) == pytest.approx(0.58680, abs=1e-4)


def test_dift_reads_the_decoder_blocks_output_averaged_over_its_noise_draws(sd21):
    """The feature is up_blocks[1]'s return value (after its upsampler), seen by a plain forward hook, averaged
    over the ensemble's rows, each with its own noise; the same image gives the same features in another pass."""
    rng = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(64, 64, 3, generator=rng) * 255).byte().numpy())
    head = DiftHead(DiftSettings(ensemble=3, timestep=261), 64)
    seen = []
    handle = sd21.unet.up_blocks[1].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        (features,) = run_heads(sd21, [head], Item("x", image))
    finally:
        handle.remove()
    (block_out,) = seen
    assert block_out.shape[0] == 3 and not torch.equal(block_out[0], block_out[1])   # each copy its own noise
    torch.testing.assert_close(features, block_out.float().mean(0))
    latent = 64 // sd21.vae_factor
    assert features.shape[-1] == latent // sd21.probe.sites["up_blocks.1.hook_out"].divisor
    (again,) = run_heads(sd21, [DiftHead(DiftSettings(ensemble=3), 64), head], Item("x", image))[1:]
    torch.testing.assert_close(again, features, rtol=0, atol=1e-5)   # its own draws in a 6-row batch


def test_the_describer_gives_features_and_the_images_size_and_a_transformer_is_refused(sd21, tmp_path):
    Image.new("RGB", (80, 48), (200, 30, 30)).save(tmp_path / "a.png")
    features, hw = dift_describer(sd21, DiftSettings(ensemble=2, image_size=64))(tmp_path / "a.png")
    assert hw == (48, 80) and features.dim() == 3
    with pytest.raises(DiffprobeError, match="decoder block"):
        DiftHead(DiftSettings(), 64).plan(tiny_backbone("pixart").probe.sites)
