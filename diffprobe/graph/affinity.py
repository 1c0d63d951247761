"""Affinity graphs over N nodes (the positions of an h x w grid, row-major): symmetric, non-negative
weights, so the Laplacian L = D - W is positive semi-definite.

Memory at 64 x 64 (N = 4,096): a dense float32 W is 64 MiB; an 8-neighbour grid graph holds about
65,000 weights (under 1 MiB as a sparse tensor); a kNN graph N * k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError

EDGE_CHUNK_VALUES = 2**24  # feature values gathered per chunk of grid edges


@dataclass
class Graph:
    """weights (N, N): a dense tensor or a sparse COO tensor, symmetric and non-negative."""

    weights: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.weights.shape[0])

    @property
    def sparse(self) -> bool:
        return self.weights.is_sparse

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """W @ x for x (N,) or (N, M)."""
        if self.sparse:
            return torch.sparse.mm(self.weights, x[:, None] if x.dim() == 1 else x).reshape(x.shape)
        return self.weights @ x

    def degree(self) -> torch.Tensor:
        """(N,) row sums of W."""
        return self.matmul(torch.ones(self.n, dtype=self.weights.dtype, device=self.weights.device))

    def dense(self) -> torch.Tensor:
        return self.weights.to_dense() if self.sparse else self.weights

    def laplacian_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """L @ x = D x - W x for x (N,) or (N, M)."""
        d = self.degree()
        return (d[:, None] if x.dim() == 2 else d) * x - self.matmul(x)


def check_square(m: torch.Tensor, what: str) -> None:
    """One-line error unless m is (N, N)."""
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise DiffprobeError(f"{what} must be a square (N, N) matrix, got shape {tuple(m.shape)}")


def check_probabilities(probs: torch.Tensor) -> None:
    """One-line error unless self-attention probs are a square (N, N) matrix of non-negative values."""
    check_square(probs, "self-attention")
    if (probs < 0).any():
        raise DiffprobeError("self-attention probabilities must be non-negative")


def attention_graph(probs: torch.Tensor) -> Graph:
    """The graph of self-attention probabilities P (N, N) (rows sum to 1): W = (P + P^T) / 2."""
    check_probabilities(probs)
    return Graph((probs + probs.T) / 2)


def stationary(probs: torch.Tensor, tol: float = 1e-12, max_steps: int = 10_000) -> torch.Tensor:
    """(N,) float64: the stationary distribution pi = pi P of a row-stochastic P (N, N), by power iteration from
    the uniform distribution (unique and positive for strictly positive rows, as softmax attention's)."""
    p = probs.double()
    pi = torch.full((p.shape[0],), 1.0 / p.shape[0], dtype=torch.float64)
    for _ in range(max_steps):
        nxt = pi @ p
        nxt /= nxt.sum()
        done = float((nxt - pi).abs().max()) < tol
        pi = nxt
        if done:
            break
    return pi


def walk_graph(probs: torch.Tensor, steps: int = 1) -> Graph:
    """The graph of a k-step random walk on self-attention P (N, N) (Meila & Shi; "Diffusing, Walking and
    Cutting", WACV 2026): the flow F = diag(pi) P^k, symmetrised, W = (F + F^T) / 2 (float64). Its degrees are pi,
    so the normalised cut of W is the walk's: the chance of leaving S in k steps from S, plus leaving S'."""
    check_probabilities(probs)
    if steps < 1:
        raise DiffprobeError(f"the walk needs at least one step, got {steps}")
    p = probs.double()
    p = p / p.sum(1, keepdim=True)
    walk = torch.linalg.matrix_power(p, steps)
    flow = stationary(p)[:, None] * walk
    return Graph((flow + flow.T) / 2)


def grid_edges(h: int, w: int, neighbours: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) node indices (E,) of every undirected edge of an h x w grid, each once (i < j); 4 or 8 neighbours."""
    if neighbours not in (4, 8):
        raise DiffprobeError(f"grid graphs join 4 or 8 neighbours, not {neighbours}")
    steps = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if neighbours == 8 else [])
    src, dst = [], []
    for dy, dx in steps:
        ys, xs = torch.meshgrid(torch.arange(h - dy), torch.arange(max(0, -dx), w - max(0, dx)), indexing="ij")
        src.append((ys * w + xs).reshape(-1))
        dst.append(((ys + dy) * w + xs + dx).reshape(-1))
    i, j = torch.cat(src), torch.cat(dst)
    return torch.minimum(i, j), torch.maximum(i, j)


def feature_graph(features: torch.Tensor, grid: tuple[int, int] | None = None, neighbours: int = 8,
                  knn: int | None = None, temperature: float = 0.1) -> Graph:
    """Sparse graph of features (N, C): W_ij = exp((cos(f_i, f_j) - 1) / temperature) on the edges of the
    h x w `grid` (4 or 8 neighbours), or, with `knn`, between each node and its knn most similar nodes
    (symmetrised by the maximum)."""
    if features.dim() != 2:
        raise DiffprobeError(f"features must be (N, C), got shape {tuple(features.shape)}")
    if temperature <= 0:
        raise DiffprobeError(f"the graph temperature must be > 0, got {temperature}")
    f = F.normalize(features.float(), dim=1)
    n = f.shape[0]
    if knn is not None:
        if not 1 <= knn < n:
            raise DiffprobeError(f"knn must lie in [1, {n - 1}] for {n} nodes, got {knn}")
        sims = f @ f.T
        sims.fill_diagonal_(-2.0)
        cos, j = sims.topk(knn, dim=1)
        i = torch.arange(n).repeat_interleave(knn)
        i, j, cos = torch.cat([i, j.reshape(-1)]), torch.cat([j.reshape(-1), i]), torch.cat([cos.reshape(-1)] * 2)
        weights = torch.exp((cos - 1) / temperature)
        dense_idx = i * n + j  # symmetrise by the maximum: duplicates keep the larger weight
        order = torch.argsort(weights)
        key, weights = dense_idx[order], weights[order]
        uniq, inverse = torch.unique(key, return_inverse=True)
        kept = torch.zeros(len(uniq)).scatter_reduce(0, inverse, weights, reduce="amax", include_self=False)
        return Graph(torch.sparse_coo_tensor(torch.stack([uniq // n, uniq % n]), kept, (n, n), check_invariants=True).coalesce())
    if grid is None or grid[0] * grid[1] != n:
        raise DiffprobeError(f"a grid graph needs grid=(h, w) with h * w = {n} nodes, got {grid}")
    i, j = grid_edges(*grid, neighbours)
    step = max(1, EDGE_CHUNK_VALUES // max(1, f.shape[1]))  # edges per chunk: f[i] * f[j] stays ~64 MiB
    cos = torch.cat([(f[i[s:s + step]] * f[j[s:s + step]]).sum(1) for s in range(0, len(i), step)])
    weights = torch.exp((cos - 1) / temperature)
    idx = torch.stack([torch.cat([i, j]), torch.cat([j, i])])
    return Graph(torch.sparse_coo_tensor(idx, torch.cat([weights, weights]), (n, n), check_invariants=True).coalesce())


def cosine_affinity(features: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    """DiffCut's dense affinity (N, N): cosine similarities of features (N, C), min-max normalised to
    [0, 1] over the matrix, raised to `alpha` (ref 10)."""
    f = F.normalize(features.float(), dim=1)
    a = f @ f.T
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    return a ** alpha
