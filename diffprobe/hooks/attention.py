"""Attention probabilities softmax(Q K^T * scale) from queries and keys, chunked over queries.

The model's own forward keeps its fast kernel (SDPA, xformers); a capture recomputes the probabilities
of the selected modules only, in fp32, a query chunk at a time, with heads reduced chunk by chunk so the
full (B, heads, N, K) tensor never exists unless asked for. How q and k come out of a module is the model
family's business (diffprobe.families); the arithmetic here is shared.
"""

from __future__ import annotations

import math

from einops import rearrange
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# fp32 score elements per query chunk of all heads with gradients (4 Mi = 16 MiB): small enough to stay
# cache-friendly, which on a CPU makes the recomputation about twice as fast as 256 MiB chunks.
CHUNK_ELEMENTS = 1 << 22
# Score elements of one head's query chunk without gradients (2 Mi = 8 MiB in fp32; `_head_blocks`).
HEAD_CHUNK_ELEMENTS = 1 << 21
# With gradients, a call whose (B, heads, N, K) fp32 probabilities hold at most this many bytes keeps them for its
# backward; a larger one checkpoints each query chunk and computes its softmax again in the backward.
KEEP_FOR_BACKWARD_BYTES = 64 << 20


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
    """Bicubically upsample (B, h*w, C) hidden states laid out on `grid` to (B, H*W, C) on `size`, interpolated in
    fp32 and returned in the states' dtype (the module's projections take them next)."""
    x = rearrange(hidden, "b (h w) c -> b c h w", h=grid[0], w=grid[1])
    x = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False)
    return rearrange(x, "b c h w -> b (h w) c").to(hidden.dtype)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, n, heads * d) -> (B, heads, n, d)."""
    return rearrange(x, "b n (heads d) -> b heads n d", heads=heads)


def _softmax(q: torch.Tensor, k_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k_t + bias) in fp32 for q (B, h, n, d) pre-scaled and k_t (B, h, d, K): (B, h, n, K)."""
    scores = torch.matmul(q, k_t)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1, dtype=torch.float32)


def _softmax_over(scores: torch.Tensor, q: torch.Tensor, k_t: torch.Tensor, bias: torch.Tensor | None,
                  lse: torch.Tensor | None = None) -> torch.Tensor:
    """`_softmax` without gradients, written over the preallocated fp32 `scores` (n, K), for one head's fp32 q (n, d)
    pre-scaled, k_t (d, K) and bias broadcastable to (n, K).

    The softmax runs in place (aten's out= variant with out aliasing its input: each row is read before it is
    overwritten). With `lse` (n,), the rows' log normalisers, the probabilities are exp(scores - lse): columns of
    a softmax over more keys than k_t holds.
    """
    torch.mm(q, k_t, out=scores)
    if bias is not None:
        scores.add_(bias)
    if lse is not None:
        return scores.sub_(lse[:, None]).exp_()
    return torch.ops.aten._softmax.out(scores, -1, False, out=scores)


def reduce_heads(probs: torch.Tensor, heads: str | int) -> torch.Tensor:
    """(B, h, n, K) -> (B, n, K) for "mean"/"sum"/an int head index, unchanged for "none"."""
    if heads == "mean":
        return probs.mean(dim=1)
    if heads == "sum":
        return probs.sum(dim=1)
    if isinstance(heads, int):
        return probs[:, heads]
    return probs


def _chunk_probs(q: torch.Tensor, k_t: torch.Tensor, bias: torch.Tensor | None, heads: str,
                 keys: slice = slice(None)) -> torch.Tensor:
    return reduce_heads(_softmax(q, k_t, bias)[..., keys], heads)


def _chunk_rows(bias: torch.Tensor | None, start: int, chunk: int) -> torch.Tensor | None:
    """The rows of a bias for queries start..start+chunk (a mask is (.., 1, K) or per query (.., N, K))."""
    if bias is None or bias.shape[-2] == 1:
        return bias
    return bias[..., start : start + chunk, :]


def query_chunk(batch: int, heads: int, num_keys: int) -> int:
    """Queries per chunk so that one chunk's (batch, heads, chunk, num_keys) scores hold CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // max(1, batch * heads * num_keys))


def _head_blocks(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, lse: torch.Tensor | None = None):
    """Yields (row, head, queries, probabilities) for q (B, h, N, d) pre-scaled, k (B, h, K, d), bias
    broadcastable to (B, h, N, K): for each batch row, each chunk of queries (a slice), each head in turn, the
    (n, K) fp32 softmax of those queries' scores (exp(scores - lse) with `lse` (B, h, N)); run it without
    gradients.

    Scores are computed in fp32 whatever the model's dtype (as PyTorch's fused CPU kernel accumulates them). One
    head's chunk of scores (HEAD_CHUNK_ELEMENTS) stays in cache while it is scored, normalised, multiplied and
    reduced, and the heads of a chunk reduce into the same rows; the keys are laid out transposed once, since a
    matmul against a transposed view copies it at every call. The probabilities live in one reused buffer,
    valid until the next block.
    """
    b, h, n, _ = q.shape
    num_keys = k.shape[2]
    q = q.float()
    bias = None if bias is None else bias.float().expand(b, h, -1, -1)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // max(1, num_keys))
    buffer = torch.empty(min(chunk, n) * num_keys, dtype=torch.float32, device=q.device)
    k_t = k.float().transpose(-1, -2).contiguous()
    for i in range(b):
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            scores = buffer[: (rows.stop - start) * num_keys].view(-1, num_keys)
            for j in range(h):
                yield i, j, rows, _softmax_over(scores, q[i, j, rows], k_t[i, j],
                                                None if bias is None else _chunk_rows(bias[i, j], start, chunk),
                                                None if lse is None else lse[i, j, rows].float())


def _reduce_head(dest: torch.Tensor, probs: torch.Tensor, head: int, heads: int, mode: str | int) -> None:
    """Head `head` (of `heads`) of one chunk's probabilities (n, K) into `dest`: (n, K) accumulating the heads for
    "mean"/"sum" (the mean divided once the last is in), (n, K) for an int head index, (heads, n, K) for "none"."""
    if mode == "none":
        dest[head].copy_(probs)
    elif isinstance(mode, int):
        if head == mode:
            dest.copy_(probs)
    elif head == 0:
        dest.copy_(probs)
    else:
        dest.add_(probs)
    if mode == "mean" and head == heads - 1 and heads > 1:
        dest.mul_(1.0 / heads)


def _kept(b: int, h: int, n: int, num_keys: int, heads: str | int, device) -> torch.Tensor:
    """The fp32 tensor a head reduction fills: (b, h, n, K) for "none", else (b, n, K)."""
    return torch.empty((b, h, n, num_keys) if heads == "none" else (b, n, num_keys), dtype=torch.float32, device=device)


def _row_in(rows: slice, batch: int, i: int) -> int | None:
    """The position of batch row i among `rows`, or None."""
    span = range(*rows.indices(batch))
    return span.index(i) if i in span else None


def probs_from_qk(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None, heads: str | int = "mean",
                  grad: bool = False, lse: torch.Tensor | None = None, keys: slice = slice(None)) -> torch.Tensor:
    """softmax(q k^T + bias) for q (B, h, N, d) already scaled, k (B, h, K, d), bias broadcastable to
    (B, h, N, K) or None; computed in fp32. With `lse` (B, h, N), the log normalisers of the rows over a larger
    set of keys (see `attention_with_lse`), exp(q k^T + bias - lse) instead: a block of columns of that softmax.
    `keys` keeps those columns of the softmax over all K keys (the text block of a joint attention).

    Returns (B, N, K') for heads "mean"/"sum", (B, h, N, K') for "none", (B, N, K') for an int head index, K' the
    kept columns.
    With `grad`, the graph keeps each chunk's probabilities for the backward when the whole call's hold at most
    KEEP_FOR_BACKWARD_BYTES, and otherwise checkpoints each chunk, so that it holds only the inputs (the backward then
    computes the chunk again: about 1.5x the cost); the values and gradients are the same either way. Without
    `grad`, the result is detached.
    """
    q, k = q.float(), k.float()
    bias = None if bias is None else bias.float()
    if grad and lse is not None:
        raise ValueError("probabilities from given normalisers are computed without gradients")
    if isinstance(heads, int):
        q, k = q[:, heads : heads + 1], k[:, heads : heads + 1]
        bias = None if bias is None or bias.shape[1] == 1 else bias[:, heads : heads + 1]
        lse = None if lse is None else lse[:, heads : heads + 1]
    mode = "mean" if isinstance(heads, int) else heads
    b, h, n, _ = q.shape
    num_keys = k.shape[2]
    if grad:
        chunk = query_chunk(b, h, num_keys)
        k_t = k.transpose(-1, -2)
        keep = b * h * n * num_keys * 4 <= KEEP_FOR_BACKWARD_BYTES

        def piece(s: int) -> torch.Tensor:
            args = (q[:, :, s : s + chunk], k_t, _chunk_rows(bias, s, chunk), mode, keys)
            return _chunk_probs(*args) if keep else checkpoint(_chunk_probs, *args, use_reentrant=False)

        return torch.cat([piece(s) for s in range(0, n, chunk)], dim=-2)
    out = _kept(b, h, n, len(range(*keys.indices(num_keys))), mode, q.device)
    with torch.no_grad():
        for i, j, rows, probs in _head_blocks(q, k, bias, lse):
            _reduce_head(out[i][..., rows, :], probs[:, keys], j, h, mode)
    return out


def attend_keeping(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
                   keep: list[tuple[slice, str | int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Attention softmax(q k^T * scale + bias) v computed from explicit probabilities, one head's chunk of queries
    at a time (`_head_blocks`), keeping those probabilities as it goes.

    q (B, h, N, d), k (B, h, K, d), v (B, h, K, dv) in the model's dtype; bias broadcastable to (B, h, N, K).
    Scores and the softmax are in fp32, the output (B, h, N, dv) in v's dtype. `keep` lists
    (rows, heads) pairs: for each, the probabilities of those batch rows reduced as `reduce_heads` does, in fp32:
    (rows, N, K), or (rows, h, N, K) for "none".
    """
    b, h, n, _ = q.shape
    num_keys = k.shape[2]
    out = torch.empty((b, h, n, v.shape[-1]), dtype=v.dtype, device=v.device)
    kept = [_kept(len(range(*rows.indices(b))), h, n, num_keys, heads, q.device) for rows, heads in keep]
    positions = [[_row_in(rows, b, i) for rows, _ in keep] for i in range(b)]
    low = None if v.dtype == torch.float32 else torch.empty(max(HEAD_CHUNK_ELEMENTS, num_keys), dtype=v.dtype,
                                                            device=v.device)
    with torch.no_grad():  # the caller answers differentiable calls with the model's kernel
        for i, j, rows, probs in _head_blocks(q * scale, k, bias):
            weights = probs if low is None else low[: probs.numel()].view_as(probs).copy_(probs)
            torch.mm(weights, v[i, j], out=out[i, j, rows])
            for (_, heads), dest, r in zip(keep, kept, positions[i]):
                if r is not None:
                    _reduce_head(dest[r][..., rows, :], probs, j, h, heads)
    return out, kept


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fused attention's output (B, h, N, dv) and the log normalisers of its rows (B, h, N), logsumexp over
    keys of q k^T * scale + bias, from PyTorch's CPU flash kernel, which computes both in one pass; None where
    that kernel does not serve (other devices), so the caller computes the attention explicitly."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return None
    mask = None if bias is None else bias.to(q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                          scale=scale)
    return out, lse
