"""Clusters against known labels: purity and the adjusted Rand index (Hubert & Arabie, 1985)."""

from __future__ import annotations

import numpy as np

from diffprobe.errors import DiffprobeError


def contingency(truth, pred) -> np.ndarray:
    """(classes, clusters) counts of items with each true label and predicted cluster."""
    t, p = np.asarray(truth), np.asarray(pred)
    if t.shape != p.shape or t.ndim != 1 or t.size == 0:
        raise DiffprobeError(f"labels and clusters must be two equal non-empty 1-D arrays, got {t.shape} and {p.shape}")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((ti.max() + 1, pi.max() + 1), np.int64)
    np.add.at(table, (ti, pi), 1)
    return table


def purity(truth, pred) -> float:
    """Share of items whose cluster's most common true label is their own."""
    table = contingency(truth, pred)
    return float(table.max(axis=0).sum() / table.sum())


def adjusted_rand_index(truth, pred) -> float:
    """Rand index of the two partitions corrected for chance: 1 for identical partitions, about 0 for random."""
    table = contingency(truth, pred)

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([table.sum()]))
    top = (rows + cols) / 2
    return 1.0 if top == expected else float((index - expected) / (top - expected))
