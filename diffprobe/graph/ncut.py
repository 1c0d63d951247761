"""Normalised cuts (Shi & Malik 2000) on a dense affinity W (n, n), and DiffCut's recursion.

The bipartition: y, the second-smallest generalised eigenvector of (D - W) y = lambda D y (the Fiedler
vector of the normalised Laplacian, mapped back by D^-1/2); the split is the threshold on y, among
`candidates` evenly spaced ones (ref 100), of least Ncut(A, B) = cut(A, B) / assoc(A, V) + cut(A, B) /
assoc(B, V). The recursion (DiffCut, NeurIPS 2024) splits every part again while the best cut costs less
than tau (ref 0.5); parts that are not split are the segments.

Cost at 64 x 64 (n = 4,096): the eigenvector by Lanczos (SciPy's eigsh) on matrix-vector products, a
dense W of 64 MiB plus the (n, candidates) indicator products; parts of at most `dense_below` nodes use a
dense eigendecomposition.
"""

from __future__ import annotations

import numpy as np
import torch

from diffprobe.errors import DiffprobeError
from diffprobe.graph.affinity import check_square

DENSE_BELOW = 600  # parts smaller than this use torch.linalg.eigh; larger ones Lanczos


def fiedler_vector(weights: torch.Tensor, dense_below: int = DENSE_BELOW) -> tuple[torch.Tensor, float]:
    """(y (n,), lambda): the second-smallest generalised eigenvector of (D - W) y = lambda D y, its sign
    fixed so that its largest-magnitude entry is positive (deterministic)."""
    w = weights.double()
    n = w.shape[0]
    d = w.sum(1).clamp_min(1e-12)
    s = d.rsqrt()
    m = s[:, None] * w * s[None, :]  # D^-1/2 W D^-1/2: eigenvalues 1 - lambda
    if n <= dense_below:
        vals, vecs = torch.linalg.eigh(m)
        mu, v = float(vals[-2]), vecs[:, -2]
    else:
        from scipy.sparse.linalg import eigsh

        top = (d.sqrt() / d.sqrt().norm()).numpy()  # the known top eigenvector (eigenvalue 1), deflated
        mat = m.numpy()
        deflated = mat - top[:, None] * top[None, :]
        vals, vecs = eigsh(deflated, k=1, which="LA", tol=1e-8, v0=np.ones(n) / np.sqrt(n))
        mu, v = float(vals[0]), torch.from_numpy(vecs[:, 0])
    y = s * v
    y = y * torch.sign(y[y.abs().argmax()])
    return y, 1.0 - mu


def ncut_values(weights: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Ncut of each bipartition: masks (n, M) bool (True: part A) -> (M,) cut/assoc(A) + cut/assoc(B);
    inf where a part is empty."""
    w = weights.double()
    x = masks.double()
    d = w.sum(1)
    assoc_a = d @ x
    assoc_b = d.sum() - assoc_a
    cut = assoc_a - (x * (w @ x)).sum(0)
    out = cut / assoc_a + cut / assoc_b
    empty = (masks.sum(0) == 0) | (masks.sum(0) == masks.shape[0])
    return torch.where(empty, torch.full_like(out, float("inf")), out)


def bipartition(weights: torch.Tensor, y: torch.Tensor | None = None, candidates: int = 100) -> tuple[torch.Tensor, float]:
    """(mask (n,) bool, Ncut) of the best split of the graph along y (default: its Fiedler vector)."""
    if y is None:
        y = fiedler_vector(weights)[0]
    lo, hi = float(y.min()), float(y.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return torch.zeros(len(y), dtype=torch.bool), float("inf")
    thresholds = torch.linspace(lo, hi, candidates + 2, dtype=torch.float64)[1:-1]
    masks = y.double()[:, None] > thresholds[None, :]
    values = ncut_values(weights, masks)
    best = int(values.argmin())
    return masks[:, best], float(values[best])


def recursive_ncut(weights: torch.Tensor, tau: float = 0.5, min_size: int = 1, max_segments: int = 64,
                   candidates: int = 100) -> tuple[torch.Tensor, list[float]]:
    """Segments of the graph W (N, N): (labels (N,) int64 0..K-1 in order of first node, the Ncut of every
    accepted split). A part is split while its best cut costs less than tau and both sides keep min_size
    nodes; at most max_segments segments."""
    check_square(weights, "the affinity")
    if tau <= 0:
        raise DiffprobeError(f"the normalised-cut threshold tau must be > 0, got {tau}")
    n = weights.shape[0]
    pending = [torch.arange(n)]
    leaves, costs = [], []
    while pending:
        part = pending.pop()
        if len(part) < 2 * min_size or len(leaves) + len(pending) + 1 >= max_segments:
            leaves.append(part)
            continue
        sub = weights[part][:, part]
        mask, cost = bipartition(sub, candidates=candidates)
        if cost < tau and min(int(mask.sum()), int((~mask).sum())) >= min_size:
            costs.append(cost)
            pending += [part[~mask], part[mask]]
        else:
            leaves.append(part)
    labels = torch.empty(n, dtype=torch.long)
    for k, part in enumerate(sorted(leaves, key=lambda p: int(p.min()))):
        labels[part] = k
    return labels, costs
