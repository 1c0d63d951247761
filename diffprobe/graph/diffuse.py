"""Spreading an activation a over a graph: random walk with restart, attention powers, Laplacian diffusion.

a: (N,) or (N, M) (M activations diffused at once, e.g. one per word). P: (N, N) row-stochastic
(self-attention: P_ij = how much position i attends to j), so (P a)_i averages a over what i attends to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.graph.affinity import Graph


@dataclass
class DiffusionInfo:
    """iterations run and the final relative residual (max over columns)."""

    iterations: int
    residual: float


def attention_power(probs: torch.Tensor, a: torch.Tensor, power: int) -> torch.Tensor:
    """P^power a: the activation averaged `power` times over what each position attends to."""
    if power < 0:
        raise DiffprobeError(f"the attention power must be >= 0, got {power}")
    x = a
    for _ in range(power):
        x = probs @ x
    return x


def random_walk(probs: torch.Tensor, a: torch.Tensor, restart: float = 0.5, tol: float = 1e-6,
                max_steps: int = 1000) -> tuple[torch.Tensor, DiffusionInfo]:
    """x = (1 - g) sum_k g^k P^k a, the random walk with restart g in [0, 1) (the fixed point of
    x = g P x + (1 - g) a), summed until a term is below tol times the sum (relative, max over columns)."""
    if not 0 <= restart < 1:
        raise DiffprobeError(f"the random-walk continuation g must lie in [0, 1), got {restart}")
    term = (1 - restart) * a
    x = term.clone()
    for k in range(1, max_steps + 1):
        term = restart * (probs @ term)
        x = x + term
        rel = float((term.abs().amax(0) / x.abs().amax(0).clamp_min(1e-30)).max())
        if rel < tol:
            return x, DiffusionInfo(k, rel)
    return x, DiffusionInfo(max_steps, rel if max_steps else 0.0)


def laplacian_diffusion(graph: Graph, a: torch.Tensor, beta: float = 10.0, tol: float = 1e-6,
                        max_iter: int = 1000) -> tuple[torch.Tensor, DiffusionInfo]:
    """Solve (I + beta L) x = a, L = D - W, by conjugate gradients (the matrix is symmetric positive
    definite); stops when ||a - (I + beta L) x|| <= tol ||a|| for every column."""
    if beta < 0:
        raise DiffprobeError(f"the diffusion strength beta must be >= 0, got {beta}")
    b = a.to(graph.weights.dtype)
    cols = b if b.dim() == 2 else b[:, None]

    def apply(x):
        return x + beta * graph.laplacian_matmul(x)

    x = torch.zeros_like(cols)
    r = cols.clone()
    p = r.clone()
    rr = (r * r).sum(0)
    norm_b = cols.norm(dim=0).clamp_min(1e-30)
    it = 0
    for it in range(1, max_iter + 1):
        q = apply(p)
        alpha = rr / (p * q).sum(0).clamp_min(1e-300)
        x = x + alpha * p
        r = r - alpha * q
        rr_new = (r * r).sum(0)
        if float((rr_new.sqrt() / norm_b).max()) <= tol:
            rr = rr_new
            break
        p = r + (rr_new / rr.clamp_min(1e-300)) * p
        rr = rr_new
    residual = float(((cols - apply(x)).norm(dim=0) / norm_b).max())
    return (x if b.dim() == 2 else x[:, 0]), DiffusionInfo(it, residual)
