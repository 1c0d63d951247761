"""DIFT: the reference's noise level, the block it reads, its ensemble and its seeding; DiTF on a transformer: its
block input, the massive channels it discards and the block's own AdaLN."""

import pytest
import torch
from PIL import Image

from diffprobe.errors import DiffprobeError
from diffprobe.heads.dift import DiftHead, DiftSettings, adaln_features, dift_describer, massive_channels
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


def test_the_describer_gives_features_and_the_images_size(sd21, tmp_path):
    Image.new("RGB", (80, 48), (200, 30, 30)).save(tmp_path / "a.png")
    features, hw = dift_describer(sd21, DiftSettings(ensemble=2, image_size=64))(tmp_path / "a.png")
    assert hw == (48, 80) and features.dim() == 3
    with pytest.raises(DiffprobeError, match="decoder block"):
        DiftHead(DiftSettings(block=9), 64).plan(sd21.probe.sites)


def test_ditf_discarding_two_massive_channels_makes_tokens_distinguishable():
    """The spec's planted case: 6 tokens x 3072 N(0, 1) channels, +1e3 on channels 154 and 1446, shift = scale = 0:
    kept, every pair of tokens is nearly parallel (cosine > 0.998); discarded (found by the median rule), not."""
    x = torch.randn(3072, 2, 3, generator=torch.Generator().manual_seed(0))
    x[[154, 1446]] += 1e3
    assert massive_channels(x) == [154, 1446]
    for discard, check in (("none", lambda c: c > 0.998), ("auto", lambda c: c.abs() < 0.1),
                           ("154,1446", lambda c: c.abs() < 0.1)):
        f = adaln_features(x, torch.zeros(6 * 3072), discard).flatten(1).T      # (6 tokens, C)
        cos = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(f, dim=1).T
        off = cos[~torch.eye(6, dtype=torch.bool)]
        assert bool(check(off).all()), (discard, off)


def test_ditf_on_a_transformer_is_the_blocks_adaln_of_the_mean_input_stream():
    """On tiny PixArt: the features equal, computed here from plain forward hooks, the mean over the ensemble of the
    previous block's output tokens, discarded channels zeroed, LayerNorm (eps 1e-6, no affine), then the block's
    modulation (its scale-shift table plus the timestep embedding adaln_single gives it): order matters (a mean of
    normalised copies differs)."""
    bb = tiny_backbone("pixart")
    rng = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(64, 64, 3, generator=rng) * 255).byte().numpy())
    seen = {}
    model = bb.unet

    def keep(key, pick):
        def hook(module, args, out):
            seen.setdefault(key, pick(out))
        return hook
    handles = [model.transformer_blocks[0].register_forward_hook(keep("x", lambda out: out)),
               model.adaln_single.register_forward_hook(keep("t", lambda out: out[0]))]
    try:
        with pytest.raises(DiffprobeError, match="block 1..1"):
            DiftHead(DiftSettings(block=0), 64).plan(bb.probe.sites)
        (features,) = run_heads(bb, [DiftHead(DiftSettings(block=1, ensemble=3, discard="0,5"), 64)],
                                Item("x", image))
    finally:
        for h in handles:
            h.remove()
    x, t = seen["x"].float(), seen["t"].float()       # (3, N, C), (3, 6 C)
    c = x.shape[-1]
    mean = x.mean(0)
    mean[:, [0, 5]] = 0
    table = model.transformer_blocks[1].scale_shift_table.float()       # (6, C)
    mod = (table[None] + t.reshape(3, 6, c)).mean(0)
    want = torch.nn.functional.layer_norm(mean, (c,), eps=1e-6) * (1 + mod[1]) + mod[0]   # (N, C)
    side = int(round(mean.shape[0] ** 0.5))
    torch.testing.assert_close(features, want.T.reshape(c, side, side), rtol=1e-5, atol=1e-5)
    normalised_first = torch.nn.functional.layer_norm(x, (c,), eps=1e-6).mean(0) * (1 + mod[1]) + mod[0]
    assert not torch.allclose(features, normalised_first.T.reshape(c, side, side), atol=1e-3)
