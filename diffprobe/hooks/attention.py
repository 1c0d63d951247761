"""Attention probabilities softmax(Q K^T * scale) from queries and keys, chunked over queries.

The model's own forward keeps its fast kernel (SDPA, xformers); a capture recomputes the probabilities
of the selected modules only, in fp32, a query chunk at a time, with heads reduced chunk by chunk so the
full (B, heads, N, K) tensor never exists unless asked for. How q and k come out of a module is the model
family's business (diffprobe.backends); the arithmetic here is shared.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# fp32 score elements per query chunk (4 Mi = 16 MiB): small enough to stay cache-friendly, which on a CPU
# makes the recomputation about twice as fast as 256 MiB chunks.
CHUNK_ELEMENTS = 1 << 22


def query_grid(num_queries: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) with h * w == num_queries and the aspect ratio of the model's input latent (square if unknown)."""
    if latent_hw is None:
        h = math.isqrt(num_queries)
    else:
        h = max(1, round(math.sqrt(num_queries * latent_hw[0] / latent_hw[1])))
    if h * (num_queries // h) != num_queries:
        raise ValueError(f"cannot lay {num_queries} queries out as a grid with aspect {latent_hw}")
    return h, num_queries // h


def upsample_tokens(hidden: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Bicubically upsample (B, h*w, C) hidden states laid out on `grid` to (B, H*W, C) on `size`."""
    b, n, c = hidden.shape
    x = hidden.transpose(1, 2).reshape(b, c, *grid)
    x = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False)
    return x.flatten(2).transpose(1, 2)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, n, heads * d) -> (B, heads, n, d)."""
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads).transpose(1, 2)


def _chunk_probs(q: torch.Tensor, k_t: torch.Tensor, bias: torch.Tensor | None, heads: str) -> torch.Tensor:
    """Probabilities of one query chunk: q (B, h, n, d) pre-scaled, k_t (B, h, d, K) -> reduced over heads."""
    scores = torch.matmul(q, k_t)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    if heads == "mean":
        return probs.mean(dim=1)
    if heads == "sum":
        return probs.sum(dim=1)
    return probs  # "none" or one head already selected: (B, h, n, K)


def probs_from_qk(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None, heads: str | int = "mean",
                  grad: bool = False) -> torch.Tensor:
    """softmax(q k^T + bias) for q (B, h, N, d) already scaled, k (B, h, K, d), bias broadcastable to
    (B, h, N, K) or None; computed in fp32.

    Returns (B, N, K) for heads "mean"/"sum", (B, h, N, K) for "none", (B, N, K) for an int head index.
    With `grad`, each chunk is checkpointed so the graph holds only the inputs, not the probabilities.
    """
    q, k = q.float(), k.float()
    bias = None if bias is None else bias.float()
    if isinstance(heads, int):
        q, k = q[:, heads : heads + 1], k[:, heads : heads + 1]
        bias = None if bias is None or bias.shape[1] == 1 else bias[:, heads : heads + 1]
    k_t = k.transpose(-1, -2)
    b, h, n, _ = q.shape
    num_keys = k.shape[2]
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * num_keys))
    mode = "mean" if isinstance(heads, int) else heads

    def bias_rows(start: int) -> torch.Tensor | None:  # a mask is (.., 1, K) or per query (.., N, K)
        if bias is None or bias.shape[-2] == 1:
            return bias
        return bias[..., start : start + chunk, :]

    if grad:
        pieces = [checkpoint(_chunk_probs, q[:, :, s : s + chunk], k_t, bias_rows(s), mode, use_reentrant=False)
                  for s in range(0, n, chunk)]
        return torch.cat(pieces, dim=-2)
    shape = (b, h, n, num_keys) if mode == "none" else (b, n, num_keys)
    out = torch.empty(shape, dtype=torch.float32, device=q.device)
    for start in range(0, n, chunk):
        out[..., start : start + chunk, :] = _chunk_probs(q[:, :, start : start + chunk], k_t, bias_rows(start), mode)
    return out
