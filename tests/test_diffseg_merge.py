"""Merging modes of the DiffSeg head on hand-made proposals where the reference's order matters."""

import numpy as np
import pytest
import torch

from diffprobe.heads.diffseg.distance import symmetric_kl
from diffprobe.heads.diffseg.merge import (anchor_indices, anchor_positions, initial_proposals, kmeans_refine,
                                           merge_components, merge_leaders, merge_reference)

# Symmetric KL: D(A,B) = D(B,C) = 0.364, D(A,C) = 1.456; with tau = 0.5, A~B and B~C but not A~C.
A = [0.8, 0.1, 0.1]
B = [0.45, 0.45, 0.1]
C = [0.1, 0.8, 0.1]
TAU = 0.5


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def mean(*rows):
    return t(*rows).mean(dim=0)


def as_set(props):
    return sorted(tuple(round(v, 9) for v in row.tolist()) for row in props)


def test_reference_merge_depends_on_order():
    # A first: A takes {A, B}; B is consumed; C still takes {B, C} (consumed B is reused).
    out = merge_reference(t(A, B, C), TAU)
    torch.testing.assert_close(out, torch.stack([mean(A, B), mean(B, C)]))
    # B first: B takes all three at once.
    out = merge_reference(t(B, A, C), TAU)
    torch.testing.assert_close(out, mean(A, B, C)[None])


def test_components_merge_is_order_independent():
    for order in ([A, B, C], [B, A, C], [C, A, B], [A, C, B]):
        torch.testing.assert_close(merge_components(t(*order), TAU), mean(A, B, C)[None])
    far = [0.1, 0.1, 0.8]
    out = merge_components(t(far, A, B, C, far), TAU)
    assert as_set(out) == as_set(torch.stack([t(far)[0], mean(A, B, C)]))
    torch.testing.assert_close(out[0], t(far)[0])  # components come in order of their first member


def chain(n, eps=0.05):
    """n distributions over n + 1 pixels, k-th with its mass on pixels k and k + 1: neighbours in the
    chain share a pixel (distance 1.29), others share none (distance 2.59)."""
    x = torch.full((n, n + 1), eps, dtype=torch.float64)
    for k in range(n):
        x[k, k] = x[k, k + 1] = 1.0
    return x / x.sum(dim=1, keepdim=True)


def test_leaders_merge_takes_disjoint_one_hop_groups():
    x, tau = chain(5), 2.0
    close = symmetric_kl(x) < tau
    assert close[0, 1] and close[1, 2] and not close[0, 2] and not close[1, 3]  # a chain, no shortcuts
    out = merge_leaders(x, tau)
    assert merge_components(x, tau).shape[0] == 1  # components follow the chain to one group
    # leaders: seeds with most neighbours first (1, 2, 3 have 3; ties by peak position then value):
    # seed 1 takes {0, 1, 2}, then seed 3 takes {3, 4}
    assert as_set(out) == as_set(torch.stack([x[[0, 1, 2]].mean(dim=0), x[[3, 4]].mean(dim=0)]))


def test_leaders_merge_is_order_independent():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 12, generator=gen, dtype=torch.float64) ** 3
    x = x / x.sum(dim=1, keepdim=True)
    tau = float(symmetric_kl(x).median())
    base = as_set(merge_leaders(x, tau))
    assert 1 < len(base) < 40
    for seed in range(3):
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(seed))
        assert as_set(merge_leaders(x[perm], tau)) == base


def test_initial_proposals_average_close_maps():
    maps = t(A, B, C)
    out = initial_proposals(maps, torch.tensor([0, 2]), TAU)
    torch.testing.assert_close(out, torch.stack([mean(A, B), mean(B, C)]))


def test_anchor_grid_matches_reference_positions():
    assert anchor_positions(64, 16) == list(range(1, 62, 4))
    assert anchor_positions(64, 1) == [31]
    idx = anchor_indices((4, 6), 2)
    # rows {0, 3} (start (3-3)//2 = 0), cols {0, 5}: row-major flat indices on a 6-wide grid
    assert idx.tolist() == [0, 5, 18, 23]


def test_kmeans_refinement_moves_to_cluster_means_and_drops_empty():
    pts = t([0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.0, 0.1, 0.9], [0.0, 0.3, 0.7])
    init = t([0.6, 0.2, 0.2], [0.2, 0.2, 0.6], [0.0, 1.0, 0.0])
    out = kmeans_refine(pts, init)
    torch.testing.assert_close(out, torch.stack([mean(pts[0].tolist(), pts[1].tolist()),
                                                 mean(pts[2].tolist(), pts[3].tolist())]))


@pytest.mark.parametrize("fp16", [False, True])
def test_reference_mode_matches_the_literal_reference_algorithm(fp16):
    from diffprobe.heads.diffseg import SegmentSettings, segment
    from diffseg_literal import straightforward
    from diffseg_planted import planted_attention, voronoi_segmentation

    seg = voronoi_segmentation(16, regions=9, seed=1)
    maps = {(s, s): planted_attention(seg, s, layers=2, noise=0.8, floor=1e-6, seed=s) for s in (16, 8, 4, 2)}
    literal = straightforward(maps, 16, tau=1.1, points=8, chunk=16, out_px=40, fp16=fp16)
    res = segment(maps, size=(40, 40), params=SegmentSettings(tau=1.1, anchors=8, merge="reference", fp16_kl=fp16))
    assert len(torch.unique(literal)) > 3
    # same partition, and same label order (both number proposals in the reference's order)
    _, literal_compact = torch.unique(literal, return_inverse=True)
    assert torch.equal(literal_compact, res.labels)
    # the planted floor (1e-6 spread over the map) falls below float16's smallest subnormal in most maps:
    # in the reference's numerics their anchors are close to nothing and vanish
    assert res.counts[0] < 64 if fp16 else res.counts[0] == 64


def numpy_fp16_kl(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The reference's iteration-0 KL written independently in numpy float16: (n, D) x (m, D) -> (n, m)."""
    x16, y16 = x.astype(np.float16)[:, None, :], y.astype(np.float16)[None, :, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        quotient = np.log(x16) - np.log(y16)
        kl_1 = (x16 * quotient).sum(-1, dtype=np.float32) / 2
        kl_2 = -(y16 * quotient).sum(-1, dtype=np.float32) / 2
    return kl_1 + kl_2


def test_fp16_distances_match_an_independent_float16_computation():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 256, generator=gen, dtype=torch.float64)
    logits[::3, :20] -= 40.0  # every third map has probabilities far below float16's smallest value
    maps = logits.softmax(dim=1)
    ours = symmetric_kl(maps[:10], maps, eps=0.0, fp16=True).numpy()
    theirs = numpy_fp16_kl(maps[:10].numpy(), maps.numpy())
    nan = np.isnan(theirs)
    assert nan.any() and not nan.all()
    assert np.array_equal(np.isnan(ours), nan)  # exactly the pairs where either map holds a float16 zero
    np.testing.assert_allclose(ours[~nan], theirs[~nan], rtol=2e-2, atol=2e-2)
    # in float32 with the epsilon no distance is NaN
    assert np.isfinite(symmetric_kl(maps[:10].float(), maps.float()).numpy()).all()


def test_reference_numerics_drop_anchors_whose_map_holds_a_float16_zero():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    logits[5, :3] = -60.0  # map 5 is below float16's range at three pixels
    maps = logits.softmax(dim=1)
    anchors = torch.arange(16)
    props = initial_proposals(maps, anchors, tau=0.3, fp16=True)
    assert torch.isnan(props[5]).all() and torch.isfinite(props[torch.arange(16) != 5]).all()
    merged = merge_reference(props, tau=0.3, eps=0.0)
    assert torch.isfinite(merged).all() and len(merged) <= 15  # the NaN proposal formed no group
    assert torch.isfinite(initial_proposals(maps, anchors, tau=0.3)).all()  # the float32 path keeps it
