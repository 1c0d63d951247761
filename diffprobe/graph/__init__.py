"""Operators on graphs over image positions (N = h * w nodes), shared by the heads: no Hydra, no I/O.

- affinity: graphs from captured self-attention (symmetrised row-stochastic P, or the symmetrised flow of a k-step
  walk on it, diag(pi) P^k), from features (cosine
  on grid neighbours or k nearest neighbours, W_ij = exp((cos - 1) / T)) and DiffCut's dense affinity
  (min-max cosine raised to alpha);
- diffuse: random walk with restart x = (1 - g) sum_k g^k P^k a, attention powers P^k a, and Laplacian
  diffusion (I + beta L) x = a by conjugate gradients with a residual stop;
- ncut: the normalised-cut bipartition (second eigenvector of the normalised Laplacian, the threshold
  of least Ncut) and its recursion stopped by cut cost.
"""

from diffprobe.graph.affinity import (Graph, attention_graph, cosine_affinity, feature_graph, grid_edges, stationary,
                                      walk_graph)
from diffprobe.graph.diffuse import DiffusionInfo, attention_power, laplacian_diffusion, random_walk
from diffprobe.graph.ncut import bipartition, fiedler_vector, ncut_values, recursive_ncut

__all__ = ["DiffusionInfo", "Graph", "attention_graph", "attention_power", "bipartition", "cosine_affinity",
           "feature_graph", "fiedler_vector", "grid_edges", "laplacian_diffusion", "ncut_values", "random_walk",
           "recursive_ncut", "stationary", "walk_graph"]
