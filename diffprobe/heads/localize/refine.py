"""Refining a word's cross-attention map over the self-attention graph (seed 004's idea, training-free).

Inputs on the finest self-attention grid (h, w), Q = h * w: word maps a (n, Q) and the aggregated
self-attention P (Q, Q) (rows sum to 1). Methods:
- raw: a itself (DAAM-style aggregation of cross-attention);
- power: P^k a (cross-attention times self-attention powers);
- walk: random walk with restart, (1 - g) sum_j g^j P^j a;
- diffusion (default): (I + beta L) x = a on a graph of the positions: grid neighbours (8) weighted by the
  similarity of their attention rows, W_ij = exp((cos(P_i, P_j) - 1) / T) (graph "attention_rows"), or the
  symmetrised attention (P + P^T) / 2 (graph "attention").
Memory at 64 x 64: P is 64 MiB (float32); the grid graph about 32,000 edges; maps n x 4,096.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.graph import attention_graph, attention_power, feature_graph, laplacian_diffusion, random_walk

METHODS = ("raw", "power", "walk", "diffusion")
GRAPHS = ("attention_rows", "attention")


@dataclass(frozen=True)
class RefineSettings:
    """method: one of METHODS; power: k of P^k; restart: g of the random walk; beta: diffusion strength;
    graph: one of GRAPHS (diffusion); temperature: T of the attention_rows graph; neighbours: 4 or 8."""

    method: str = "diffusion"
    power: int = 2
    restart: float = 0.5
    beta: float = 10.0
    graph: str = "attention_rows"
    temperature: float = 0.1
    neighbours: int = 8

    def __post_init__(self):
        if self.method not in METHODS:
            raise DiffprobeError(f"localize method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.graph not in GRAPHS:
            raise DiffprobeError(f"localize graph must be one of {', '.join(GRAPHS)}, not {self.graph!r}")
        if self.power < 0 or not 0 <= self.restart < 1 or self.beta < 0 or self.temperature <= 0:
            raise DiffprobeError("localize needs power >= 0, 0 <= restart < 1, beta >= 0 and temperature > 0; got "
                                 f"{self.power}, {self.restart}, {self.beta}, {self.temperature}")


def refine(word_maps: torch.Tensor, probs: torch.Tensor, grid: tuple[int, int], params: RefineSettings) -> torch.Tensor:
    """(n, Q) refined maps of word_maps (n, Q) over the self-attention probs (Q, Q) of the grid (h, w)."""
    if probs.shape != (grid[0] * grid[1],) * 2 or word_maps.shape[-1] != probs.shape[0]:
        raise DiffprobeError(f"word maps {tuple(word_maps.shape)} and self-attention {tuple(probs.shape)} do not "
                             f"match the grid {grid}")
    a = word_maps.T.double()                                     # (Q, n): columns are words
    p = probs.double()
    if params.method == "raw":
        x = a
    elif params.method == "power":
        x = attention_power(p, a, params.power)
    elif params.method == "walk":
        x = random_walk(p, a, params.restart)[0]
    else:
        graph = (attention_graph(p) if params.graph == "attention" else
                 feature_graph(p, grid, params.neighbours, temperature=params.temperature))
        x = laplacian_diffusion(graph, a, params.beta)[0]
    return x.T.float()
