"""DiffSeg head on planted inputs: aggregation, KL in matrix form, segmentation, NMS, word voting."""

import pytest
import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError
from diffprobe.heads.diffseg import SegmentSettings, aggregate, non_max_suppression, segment, symmetric_kl
from diffprobe.heads.diffseg.semantics import vote_words, word_maps
from diffseg_planted import block_segmentation, planted_attention, same_partition


def direct_symmetric_kl(p, q, eps=1e-12):
    """The formula term by term, one pair at a time."""
    out = torch.empty(len(p), len(q), dtype=torch.float64)
    for i, pi in enumerate(p):
        for j, qj in enumerate(q):
            lp, lq = pi.clamp_min(eps).log(), qj.clamp_min(eps).log()
            out[i, j] = 0.5 * (pi * (lp - lq)).sum() + 0.5 * (qj * (lq - lp)).sum()
    return out


def random_distributions(n, d, seed, zeros=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=gen, dtype=torch.float64) ** 4
    if zeros:
        x[torch.rand(n, d, generator=gen) < 0.2] = 0
    return x / x.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_matrix_kl_equals_direct_formula(chunk):
    p, q = random_distributions(5, 37, 0), random_distributions(7, 37, 1)
    torch.testing.assert_close(symmetric_kl(p, q, chunk=chunk), direct_symmetric_kl(p, q), rtol=1e-10, atol=1e-10)
    d = symmetric_kl(p, chunk=chunk)
    torch.testing.assert_close(d, d.T, rtol=0, atol=1e-10)
    assert d.diagonal().abs().max() < 1e-10


def test_matrix_kl_float32_close_to_float64():
    p = random_distributions(16, 4096, 2, zeros=False)
    d64 = symmetric_kl(p)
    d32 = symmetric_kl(p.float())
    assert (d32.double() - d64).abs().max() < 1e-4


def test_aggregation_hand_computed():
    fine = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.25, 0.25]])
    coarse = torch.ones(1, 1)  # 1x1 grid: the one query attends to the one key
    a, grid = aggregate({2: fine, 1: coarse})
    assert grid == (2, 2)
    # weights proportional to resolution: 2/3 and 1/3; the 1x1 map upsamples to uniform 0.25.
    torch.testing.assert_close(a, fine * 2 / 3 + 0.25 / 3)


def straightforward_aggregate(maps_by_side, fine):
    """The paper's formula with explicit loops over aggregated queries."""
    sides = sorted(maps_by_side, reverse=True)
    r = torch.tensor(sides, dtype=torch.float64) / sum(sides)
    out = torch.zeros(fine * fine, fine * fine, dtype=torch.float64)
    for w, s in zip(r, sides):
        up = F.interpolate(maps_by_side[s].double().reshape(-1, 1, s, s), size=(fine, fine), mode="bilinear",
                           align_corners=False).reshape(s * s, -1)
        up = up / up.sum(dim=1, keepdim=True)
        sigma = fine // s
        for i in range(fine):
            for j in range(fine):
                out[i * fine + j] += w * up[(i // sigma) * s + j // sigma]
    return out


def test_aggregation_matches_paper_formula_and_layer_mean():
    maps = {s: random_distributions(s * s, s * s, s).float() for s in (8, 4, 2)}
    two_layers = {8: torch.stack([maps[8] * 0 + 1 / 64, maps[8] * 2 - 1 / 64]), 4: maps[4], 2: maps[2]}
    expected = straightforward_aggregate(maps, 8)
    torch.testing.assert_close(aggregate(maps)[0].double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(aggregate(two_layers)[0].double(), expected, rtol=1e-5, atol=1e-7)


def test_aggregation_custom_weights_and_errors():
    maps = {4: random_distributions(16, 16, 0).float(), 2: random_distributions(4, 4, 1).float()}
    only_fine, _ = aggregate(maps, weights=[1, 0])
    torch.testing.assert_close(only_fine, maps[4])
    torch.testing.assert_close(aggregate(maps, weights={4: 3, 2: 0})[0], maps[4])
    with pytest.raises(DiffprobeError):
        aggregate(maps, weights=[1])
    with pytest.raises(DiffprobeError):
        aggregate({4: maps[4], 3: torch.ones(9, 9) / 9})  # 3 does not divide 4


@pytest.mark.parametrize("merge,fp16_kl", [("leaders", None), ("components", None), ("reference", False),
                                           ("reference", None)])
@pytest.mark.parametrize("refine", [False, True])
def test_planted_segmentation_is_recovered(merge, fp16_kl, refine):
    seg = block_segmentation(16)
    maps = {s: planted_attention(seg, s, layers=2, noise=0.05, seed=s) for s in (16, 8, 4)}
    params = SegmentSettings(tau=0.9, iterations=3, anchors=8, merge=merge, fp16_kl=fp16_kl, refine=refine)
    res = segment(maps, size=(16, 16), params=params)
    assert res.labels.shape == (16, 16)
    assert res.num_segments == 5
    assert same_partition(res.labels, seg)
    assert res.proposals.shape == (5, 16, 16)


def test_planted_segmentation_any_output_size():
    seg = block_segmentation(16)
    maps = {s: planted_attention(seg, s) for s in (16, 8, 4)}
    res = segment(maps, size=(40, 72), params=SegmentSettings(anchors=8))
    assert res.labels.shape == (40, 72)
    truth = F.interpolate(seg[None, None].float(), size=(40, 72), mode="nearest")[0, 0].long()
    # away from region boundaries the labels agree exactly (up to permutation)
    interior = F.max_pool2d(truth[None, None].float(), 5, 1, 2)[0, 0] == -F.max_pool2d(
        -truth[None, None].float(), 5, 1, 2)[0, 0]
    assert same_partition(res.labels[interior], truth[interior])
    assert (interior.float().mean()) > 0.5


def test_segment_is_deterministic():
    seg = block_segmentation(16)
    maps = {s: planted_attention(seg, s, noise=0.3, seed=7) for s in (16, 8)}
    a = segment(maps, params=SegmentSettings(anchors=8, tau=0.5))
    b = segment(maps, params=SegmentSettings(anchors=8, tau=0.5))
    assert a.labels.shape == (128, 128)
    assert torch.equal(a.labels, b.labels)


def test_nms_argmax_chunked_and_ties():
    gen = torch.Generator().manual_seed(0)
    props = torch.rand(37, 16, generator=gen)
    full = F.interpolate(props.reshape(-1, 1, 4, 4), size=(9, 13), mode="bilinear", align_corners=False)
    expected = full[:, 0].argmax(dim=0)
    assert torch.equal(non_max_suppression(props, (4, 4), (9, 13), chunk=5), expected)
    tied = torch.ones(3, 4)
    assert non_max_suppression(tied, (2, 2), (2, 2), chunk=1).eq(0).all()


def test_params_validation():
    with pytest.raises(DiffprobeError):
        SegmentSettings(iterations=1)
    with pytest.raises(DiffprobeError):
        SegmentSettings(tau=[1.0, 1.0])
    with pytest.raises(DiffprobeError):
        SegmentSettings(merge="greedy")
    assert SegmentSettings(tau=[1.0, 0.5, 0.2]).taus() == [1.0, 0.5, 0.2]


def test_word_voting():
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    cross = torch.zeros(8, 4)  # 2x4 grid, 4 tokens: BOS, "cat", "so", "fa"
    cross[:, 0] = 0.5
    cross[[0, 1, 4, 5], 1] = 0.5
    cross[[2, 3, 6, 7], 2] = 0.3
    cross[[2, 3, 6, 7], 3] = 0.2
    maps = word_maps({(2, 4): cross}, [[1], [2, 3]], size=(2, 4))
    torch.testing.assert_close(maps[1], torch.tensor([[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]))
    assert vote_words(labels, maps) == [0, 1]


def test_planted_voronoi_regions_are_recovered():
    from diffseg_planted import voronoi_segmentation

    seg = voronoi_segmentation(32, regions=12, seed=3)
    res = segment({32: planted_attention(seg, 32, noise=0.2)}, size=(32, 32), params=SegmentSettings(tau=1.1))
    assert res.num_segments == 12
    assert same_partition(res.labels, seg)
