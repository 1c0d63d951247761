"""The peers' aggregations of cross-attention into word maps, on planted maps whose answer is known."""

import torch
from einops import rearrange

from diffprobe.heads.heatmaps import amd_word_maps, daam_word_maps


def planted(side: int, heads: int, region: tuple[slice, slice], token: int, tokens: int = 4) -> torch.Tensor:
    """(heads, side^2, tokens): positions in `region` put all their mass on `token`, the others on token 0."""
    m = torch.zeros(side, side, tokens)
    m[..., 0] = 1
    m[region[0], region[1], 0] = 0
    m[region[0], region[1], token] = 1
    return rearrange(m, "h w t -> (h w) t").expand(heads, -1, -1).clone()


S = (slice(16, 32), slice(16, 32))
S_HALF = (slice(8, 16), slice(8, 16))
OTHER = (slice(40, 56), slice(0, 16))


def test_daam_on_one_grid_is_the_step_sum_of_the_planted_region():
    """Three 64 x 64 layers (2 heads) summed over 2 steps: the word's row is exactly 2 * 1[S] (bicubic to the same
    size is the identity; the mean over (layer, head) pairs of equal maps is that map)."""
    layers = [(1, (64, 64), 2 * planted(64, 2, S, 2)) for _ in range(3)]
    got = daam_word_maps(layers, [[2]])
    want = torch.zeros(64, 64)
    want[S] = 2
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-6)


def test_daam_upsamples_coarser_layers_skips_the_eighth_and_means_a_words_tokens():
    layers = [(1, (64, 64), planted(64, 2, S, 2)), (2, (32, 32), planted(32, 2, S_HALF, 2)),
              (8, (8, 8), planted(8, 2, (slice(5, 7), slice(0, 2)), 2))]   # at 1/8 of the latent: skipped
    word = daam_word_maps(layers, [[2]])[0]
    mask = (word - word.min()) / (word.max() - word.min()) > 0.4
    truth = torch.zeros(64, 64, dtype=torch.bool)
    truth[S] = True
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9
    assert not mask[40:, :16].any()                       # the skipped layer's region
    two = [(1, (64, 64), planted(64, 1, S, 2) + planted(64, 1, OTHER, 3))]
    torch.testing.assert_close(daam_word_maps(two, [[2, 3]])[0], (daam_word_maps(two, [[2]])[0] +
                                                             daam_word_maps(two, [[3]])[0]) / 2)


def test_attention_map_diffusers_sums_heads_and_means_layers_on_the_first_grid():
    """Two layers on one 8 x 8 grid, 3 heads each with mass 1 on token 3 inside a 4 x 4 square: the token's map is
    exactly 3 * 1[square]; a layer on a coarser grid is resized bilinearly to the first one's grid."""
    square = (slice(2, 6), slice(2, 6))
    layers = [((8, 8), planted(8, 3, square, 3)), ((8, 8), planted(8, 3, square, 3))]
    want = torch.zeros(8, 8)
    want[square] = 3
    torch.testing.assert_close(amd_word_maps(layers, [[3]])[0], want, rtol=0, atol=1e-6)
    coarse = layers + [((4, 4), planted(4, 3, (slice(1, 3), slice(1, 3)), 3))]
    got = amd_word_maps(coarse, [[3]])[0]
    assert got.shape == (8, 8) and got[3:5, 3:5].min() > got[0, 0] and got[0, 0] == 0
