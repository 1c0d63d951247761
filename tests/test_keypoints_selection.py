"""KL candidate ranking, farthest point sampling and the frequency vote, on planted maps."""

import pytest
import torch

from diffprobe.errors import DiffprobeError
from diffprobe.heads.keypoints.selection import (farthest_point_sampling, kl_to_gaussian,
                                                 most_frequent, rank_candidates, spread_tokens)
from diffprobe.heads.keypoints.targets import gaussian_maps


def planted_maps():
    """Token 0: flat; 1: a strong blob; 2: a weak blob; 3: two blobs; 4: a strong blob elsewhere."""
    size = (32, 32)
    flat = torch.full(size, 0.02)
    sharp = gaussian_maps(torch.tensor([8.5, 8.5]), size, 2.0)
    weak = 0.3 * gaussian_maps(torch.tensor([20.5, 10.5]), size, 2.0)
    double = gaussian_maps(torch.tensor([[5.5, 25.5], [25.5, 25.5]]), size, 2.0).sum(0)
    sharp2 = gaussian_maps(torch.tensor([23.5, 8.5]), size, 2.0)   # mirror image of `sharp`
    return torch.stack([flat, sharp, weak, double, sharp2])


def test_kl_ranking_prefers_single_sharp_blobs():
    maps = planted_maps()
    kl = kl_to_gaussian(maps, sigma=2.0)
    assert torch.allclose(kl[1], kl[4], atol=1e-5)            # same shape, different place
    # softmax over raw values: KL = -H(target) - <target, map> + logsumexp(map): one strong peak ranks
    # first, a second blob elsewhere costs a little, a weak peak more, a flat map (argmax in a corner) most
    assert kl[1] < kl[3] < kl[2] < kl[0]
    assert rank_candidates(maps, 2, sigma=2.0).tolist() == [1, 4]
    with pytest.raises(DiffprobeError):
        rank_candidates(maps, 6, sigma=2.0)


def test_kl_matches_hand_computation_with_softmax_over_raw_values():
    maps = torch.rand(3, 5, 6)
    kl = kl_to_gaussian(maps, sigma=1.5)
    for n in range(3):
        idx = int(maps[n].argmax())
        cy, cx = idx // 6 + 0.5, idx % 6 + 0.5
        yy, xx = torch.meshgrid(torch.arange(5) + 0.5, torch.arange(6) + 0.5, indexing="ij")
        p = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 1.5**2)).flatten() + 1e-5  # the reference's epsilon
        p = p / p.sum()
        q = torch.exp(maps[n].flatten()) / torch.exp(maps[n].flatten()).sum()
        assert torch.isclose(kl[n], (p * (p / q).log()).sum(), atol=1e-5)


def reference_kl(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """The KL of StableKeypoints' find_top_k_gaussian (ptp_utils.py, num_subjects=1) rewritten independently:
    argmax as (row, col) + 0.5, gaussian_circle on an ij grid + 0.5, +1e-5, KL to the softmax; (b,)."""
    b, h, w = maps.shape
    idx = maps.view(b, -1).argmax(-1)
    pos = torch.stack([idx // w, idx % w], -1).double() + 0.5          # (b, 2) row, col
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).double() + 0.5
    dist = (grid[None, ..., 1] - pos[:, None, None, 1]) ** 2 + (grid[None, ..., 0] - pos[:, None, None, 0]) ** 2
    target = torch.exp(-dist / (2.0 * sigma**2)).reshape(b, -1) + 1e-5
    target /= target.sum(-1, keepdim=True)
    soft = torch.softmax(maps.view(b, -1) + 1e-5, dim=-1)
    return (target * (target.log() - soft.log())).sum(-1)


def test_candidates_equal_the_references_ranking():
    gen = torch.Generator().manual_seed(0)
    blobs = gaussian_maps(torch.rand(40, 2, generator=gen) * 100 + 14, (128, 128), 2.0)
    maps = blobs * torch.rand(40, 1, 1, generator=gen) + torch.rand(40, 128, 128, generator=gen) * 0.3
    expected = reference_kl(maps.double(), 2.0)
    torch.testing.assert_close(kl_to_gaussian(maps.double(), sigma=2.0), expected, rtol=1e-9, atol=1e-9)
    assert rank_candidates(maps, 25, sigma=2.0).tolist() == torch.argsort(expected)[:25].tolist()


def test_fps_starts_with_the_farthest_pair():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [0.0, 9.0], [5.0, 5.0], [-3.0, -3.0]])
    order = farthest_point_sampling(pts, 4).tolist()
    assert set(order[:2]) == {2, 5}                 # distance 13 * sqrt(2): the farthest pair
    assert order[2] == 3                            # farthest from both chosen
    # distance to the nearest chosen of {2, 5, 3}: point 0 -> 4.24, point 1 -> 5.0, point 4 -> 6.40
    assert order[3] == 4
    assert farthest_point_sampling(pts, 1).shape == (1,)
    with pytest.raises(DiffprobeError):
        farthest_point_sampling(pts, 7)


def test_spread_tokens_maps_back_to_token_ids_and_vote():
    maps = planted_maps()
    chosen = spread_tokens(maps, torch.tensor([2, 1, 4]), 2)
    assert chosen.tolist() == [1, 4]        # peaks (8.5, 8.5) and (23.5, 8.5): the farthest pair
    assert most_frequent([torch.tensor([3, 1]), torch.tensor([1, 2]), torch.tensor([2, 1])], 2).tolist() == [1, 2]
    with pytest.raises(DiffprobeError):
        most_frequent([torch.tensor([1])], 2)
