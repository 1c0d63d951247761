"""Graph operators on planted graphs whose answers are known."""

import numpy as np
import pytest
import torch

from diffprobe.errors import DiffprobeError
from diffprobe.graph import (Graph, attention_graph, attention_power, bipartition, cosine_affinity, feature_graph,
                             fiedler_vector, grid_edges, laplacian_diffusion, ncut_values, random_walk, recursive_ncut)


def blocks(sizes, inside=1.0, between=0.0, seed=0):
    n = sum(sizes)
    w = torch.full((n, n), between, dtype=torch.float64)
    start = 0
    for s in sizes:
        w[start:start + s, start:start + s] = inside
        start += s
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    return w[perm][:, perm], perm


@pytest.mark.parametrize("n", [40, 800])  # dense eigendecomposition and Lanczos
def test_two_disconnected_blocks_give_the_exact_bipartition(n):
    w, perm = blocks([n // 4, n - n // 4])
    mask, cost = bipartition(w)
    truth = perm < n // 4   # node i of the permuted graph is original node perm[i]
    assert cost == pytest.approx(0.0, abs=1e-9)
    assert torch.equal(mask, truth) or torch.equal(mask, ~truth)


def test_fiedler_vector_of_a_path_is_monotone_and_its_eigenvalue_matches_a_dense_solve():
    n = 12
    w = torch.zeros(n, n, dtype=torch.float64)
    idx = torch.arange(n - 1)
    w[idx, idx + 1] = w[idx + 1, idx] = 1.0
    y, lam = fiedler_vector(w)
    d = w.sum(1)
    from scipy.linalg import eigh

    expected = eigh((torch.diag(d) - w).numpy(), torch.diag(d).numpy(), eigvals_only=True)[1]
    assert lam == pytest.approx(expected, rel=1e-9)
    assert (y.diff() > 0).all() or (y.diff() < 0).all()


def test_ncut_values_by_hand():
    # triangle 0-1-2 (weights 1) joined to node 3 by one edge of weight 0.5 from node 2
    w = torch.zeros(4, 4, dtype=torch.float64)
    for i, j, v in [(0, 1, 1), (1, 2, 1), (0, 2, 1), (2, 3, 0.5)]:
        w[i, j] = w[j, i] = v
    masks = torch.tensor([[True, True], [True, True], [True, False], [False, False]])
    # split {0,1,2}|{3}: cut 0.5, assoc(A) = 2 + 2 + 2.5, assoc(B) = 0.5
    # split {0,1}|{2,3}: cut 2, assoc(A) = 4, assoc(B) = 2.5 + 0.5
    np.testing.assert_allclose(ncut_values(w, masks).numpy(), [0.5 / 6.5 + 0.5 / 0.5, 2 / 4 + 2 / 3])


def test_recursion_finds_three_weakly_joined_blocks_and_stops_by_cut_cost():
    w, perm = blocks([30, 20, 25], inside=1.0, between=0.01)
    labels, costs = recursive_ncut(w, tau=0.5)
    truth = torch.bucketize(perm, torch.tensor([30, 50]), right=True)
    assert len(costs) == 2 and all(c < 0.5 for c in costs)
    # the same partition up to renaming
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth)}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3
    single, none = recursive_ncut(w, tau=1e-4)
    assert none == [] and (single == 0).all()


def test_laplacian_diffusion_of_a_delta_on_a_chain_matches_a_dense_solve():
    n = 50
    i = torch.arange(n - 1)
    w = torch.sparse_coo_tensor(torch.stack([torch.cat([i, i + 1]), torch.cat([i + 1, i])]),
                                torch.ones(2 * (n - 1), dtype=torch.float64), (n, n), check_invariants=True).coalesce()
    g = Graph(w)
    a = torch.zeros(n, 2, dtype=torch.float64)
    a[10, 0], a[40, 1] = 1.0, 2.0
    x, info = laplacian_diffusion(g, a, beta=5.0, tol=1e-10)
    dense = w.to_dense()
    expected = torch.linalg.solve(torch.eye(n, dtype=torch.float64) + 5.0 * (torch.diag(dense.sum(1)) - dense), a)
    assert torch.allclose(x, expected, atol=1e-8) and info.residual <= 1e-10
    assert x[:, 0].argmax() == 10 and x[:, 0].sum() == pytest.approx(1.0)   # mass is conserved: (I + bL) 1 = 1


def test_random_walk_equals_the_closed_form_and_powers_average():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(30, 30, generator=gen, dtype=torch.float64)
    p = p / p.sum(1, keepdim=True)
    a = torch.rand(30, generator=gen, dtype=torch.float64)
    x, info = random_walk(p, a, restart=0.7, tol=1e-12)
    expected = 0.3 * torch.linalg.solve(torch.eye(30, dtype=torch.float64) - 0.7 * p, a)
    assert torch.allclose(x, expected, atol=1e-9) and info.iterations > 10
    assert torch.allclose(attention_power(p, a, 2), p @ (p @ a))
    assert torch.allclose(attention_power(p, torch.ones(30, dtype=torch.float64), 3), torch.ones(30, dtype=torch.float64))


def test_feature_and_attention_graphs():
    i, j = grid_edges(3, 4, 4)
    assert len(i) == 3 * 3 + 2 * 4 and (i < j).all()
    assert len(grid_edges(3, 4, 8)[0]) == 17 + 2 * 2 * 3
    f = torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 6)      # the first 6 nodes (rows 0-1 of 3 x 4) one feature
    g = feature_graph(f, grid=(3, 4), neighbours=4, temperature=0.1)
    w = g.dense()
    assert torch.allclose(w, w.T) and w[0, 1] == pytest.approx(1.0)          # equal features: weight 1
    assert w[5, 9] == pytest.approx(np.exp(-10.0))                          # orthogonal: exp(-1 / T)
    assert w[0, 2] == 0                                                      # not neighbours
    k = feature_graph(f, knn=3).dense()
    assert torch.allclose(k, k.T) and ((k > 0).sum(1) >= 3).all()
    p = torch.softmax(torch.randn(12, 12), dim=1)
    assert torch.allclose(attention_graph(p).weights, (p + p.T) / 2)
    aff = cosine_affinity(f, alpha=10.0)
    assert aff.max() == pytest.approx(1.0) and aff.min() == pytest.approx(0.0)


def test_bad_graph_input_is_a_one_line_error():
    with pytest.raises(DiffprobeError, match="square"):
        attention_graph(torch.ones(3, 4))
    with pytest.raises(DiffprobeError, match="grid"):
        feature_graph(torch.ones(10, 3), grid=(3, 4))
    with pytest.raises(DiffprobeError, match="knn"):
        feature_graph(torch.ones(10, 3), knn=10)
    with pytest.raises(DiffprobeError, match="restart|continuation"):
        random_walk(torch.eye(3), torch.ones(3), restart=1.0)
    with pytest.raises(DiffprobeError, match="tau"):
        recursive_ncut(torch.eye(3), tau=0)


def _blocks(sizes, inside=0.9):
    """Row-stochastic P over consecutive blocks of `sizes`: each row puts `inside` uniformly on its own block and
    the rest uniformly on the other nodes."""
    n = sum(sizes)
    block = torch.cat([torch.full((s,), b) for b, s in enumerate(sizes)])
    same = block[:, None] == block[None, :]
    sizes_t = torch.tensor(sizes, dtype=torch.float64)[block]
    return torch.where(same, inside / sizes_t[:, None], (1 - inside) / (n - sizes_t)[:, None]).double()


def test_the_walk_graph_cuts_two_planted_blocks_at_the_walks_leaving_chance():
    """Spec (f): blocks A (60) and B (40), 0.9 inside and 0.1 across: pi(A) = pi(B) = 0.5, the split is A | B, and
    its Ncut for P^k is 1 - 0.8^k (0.2, 0.36, 0.488 for k = 1, 2, 3), as is the relaxation's eigenvalue."""
    from diffprobe.graph import bipartition, fiedler_vector, stationary, walk_graph

    p = _blocks([60, 40])
    pi = stationary(p)
    assert abs(float(pi[:60].sum()) - 0.5) < 1e-9
    for k, want in ((1, 0.2), (2, 0.36), (3, 0.488)):
        w = walk_graph(p, k).weights
        torch.testing.assert_close(w.sum(1), pi)   # the degrees are pi
        mask, cost = bipartition(w)
        assert mask[:60].unique().numel() == mask[60:].unique().numel() == 1 and mask[0] != mask[60]   # A | B
        assert abs(cost - want) < 1e-9 and abs(fiedler_vector(w)[1] - want) < 1e-9


def test_the_walk_cut_recurses_into_nested_blocks_while_a_cut_is_cheap():
    """Two blocks of two: cut the top level (cost ~0.24) and the nested one (~0.54) when tau lies above both, only the
    top level when tau lies between them."""
    from diffprobe.graph import recursive_ncut, walk_graph

    outer = _blocks([50, 50], inside=0.88)
    inner = torch.block_diag(_blocks([25, 25], inside=0.7), _blocks([30, 20], inside=0.7))
    p = 0.5 * outer + 0.5 * torch.where(inner > 0, inner, torch.zeros_like(inner))
    w = walk_graph(p, 1).weights
    labels, costs = recursive_ncut(w, tau=0.9)
    assert labels.unique().numel() == 4, costs
    assert (labels[:25] == labels[0]).all() and (labels[25:50] == labels[25]).all() and labels[0] != labels[25]
    labels, costs = recursive_ncut(w, tau=(costs[0] + max(costs[1:])) / 2)
    assert labels.unique().numel() == 2 and (labels[:50] == labels[0]).all() and (labels[50:] == labels[50]).all()
