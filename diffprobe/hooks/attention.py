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
    x = rearrange(hidden, "b (h w) c -> b c h w", h=grid[0], w=grid[1])
    x = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False)
    return rearrange(x, "b c h w -> b (h w) c")


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
    """`_softmax` without gradients, written over the preallocated `scores` (B, h, n, K) when it is fp32.

    The softmax runs in place (aten's out= variant with out aliasing its input: each row is read before it is
    overwritten), which measured 25 % cheaper per 64x64 layer than allocating the scores and probabilities anew.
    With `lse` (B, h, n), the rows' log normalisers, the probabilities are exp(scores - lse): columns of a
    softmax over more keys than k_t holds.
    """
    torch.matmul(q, k_t, out=scores)
    if bias is not None:
        scores.add_(bias)
    if lse is not None:
        return scores.sub_(lse[..., None]).exp_()
    if scores.dtype != torch.float32:
        return scores.softmax(dim=-1, dtype=torch.float32)
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


def _reduce_into(dest: torch.Tensor, probs: torch.Tensor, heads: str | int) -> None:
    """`reduce_heads(probs, heads)` written into `dest` without an intermediate tensor."""
    if heads in ("mean", "sum"):
        torch.sum(probs, dim=1, out=dest)
        if heads == "mean":
            dest.mul_(1.0 / probs.shape[1])
    else:
        dest.copy_(reduce_heads(probs, heads))


def _chunk_probs(q: torch.Tensor, k_t: torch.Tensor, bias: torch.Tensor | None, heads: str,
                 keys: slice = slice(None)) -> torch.Tensor:
    return reduce_heads(_softmax(q, k_t, bias)[..., keys], heads)


def _chunk_rows(bias: torch.Tensor | None, start: int, chunk: int) -> torch.Tensor | None:
    """The rows of a bias for queries start..start+chunk (a mask is (.., 1, K) or per query (.., N, K))."""
    if bias is None or bias.shape[-2] == 1:
        return bias
    return bias[..., start : start + chunk, :]


def _scores_view(buffer: torch.Tensor, b: int, h: int, n: int, num_keys: int) -> torch.Tensor:
    """A contiguous (b, h, n, num_keys) view of the start of a flat scores buffer (a last, shorter chunk too)."""
    return buffer[: b * h * n * num_keys].view(b, h, n, num_keys)


def query_chunk(batch: int, heads: int, num_keys: int) -> int:
    """Queries per chunk so that one chunk's (batch, heads, chunk, num_keys) scores hold CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // max(1, batch * heads * num_keys))


def probs_from_qk(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None, heads: str | int = "mean",
                  grad: bool = False, lse: torch.Tensor | None = None, keys: slice = slice(None)) -> torch.Tensor:
    """softmax(q k^T + bias) for q (B, h, N, d) already scaled, k (B, h, K, d), bias broadcastable to
    (B, h, N, K) or None; computed in fp32. With `lse` (B, h, N), the log normalisers of the rows over a larger
    set of keys (see `attention_with_lse`), exp(q k^T + bias - lse) instead: a block of columns of that softmax.
    `keys` keeps those columns of the softmax over all K keys (the text block of a joint attention).

    Returns (B, N, K') for heads "mean"/"sum", (B, h, N, K') for "none", (B, N, K') for an int head index, K' the
    kept columns.
    With `grad`, each chunk is checkpointed so the graph holds only the inputs, not the probabilities; without,
    the result is detached.
    """
    q, k = q.float(), k.float()
    bias = None if bias is None else bias.float()
    if isinstance(heads, int):
        q, k = q[:, heads : heads + 1], k[:, heads : heads + 1]
        bias = None if bias is None or bias.shape[1] == 1 else bias[:, heads : heads + 1]
        lse = None if lse is None else lse[:, heads : heads + 1]
    if grad and lse is not None:
        raise ValueError("probabilities from given normalisers are computed without gradients")
    k_t = k.transpose(-1, -2)
    b, h, n, _ = q.shape
    num_keys = k.shape[2]
    chunk = query_chunk(b, h, num_keys)
    mode = "mean" if isinstance(heads, int) else heads
    if grad:
        pieces = [checkpoint(_chunk_probs, q[:, :, s : s + chunk], k_t, _chunk_rows(bias, s, chunk), mode, keys,
                             use_reentrant=False)
                  for s in range(0, n, chunk)]
        return torch.cat(pieces, dim=-2)
    kept = len(range(*keys.indices(num_keys)))
    shape = (b, h, n, kept) if mode == "none" else (b, n, kept)
    out = torch.empty(shape, dtype=torch.float32, device=q.device)
    buffer = q.new_empty(b * h * min(chunk, n) * num_keys)
    with torch.no_grad():
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            probs = _softmax_over(_scores_view(buffer, b, h, rows, num_keys), q[:, :, start : start + rows], k_t,
                                  _chunk_rows(bias, start, chunk),
                                  None if lse is None else lse[:, :, start : start + rows].float())
            _reduce_into(out[..., start : start + rows, :], probs[..., keys], mode)
    return out


def attend_keeping(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
                   keep: list[tuple[slice, str | int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Attention softmax(q k^T * scale + bias) v computed from explicit probabilities a query chunk at a time,
    keeping those probabilities as it goes.

    q (B, h, N, d), k (B, h, K, d), v (B, h, K, dv) in the model's dtype; bias broadcastable to (B, h, N, K).
    Scores are in the model's dtype, the softmax in fp32, the output (B, h, N, dv) in v's dtype. `keep` lists
    (rows, heads) pairs: for each, the probabilities of those batch rows reduced as `reduce_heads` does, in fp32:
    (rows, N, K), or (rows, h, N, K) for "none".
    """
    b, h, n, _ = q.shape
    num_keys = k.shape[2]
    k_t = k.transpose(-1, -2)
    out = torch.empty((b, h, n, v.shape[-1]), dtype=v.dtype, device=v.device)
    kept = []
    for rows, heads in keep:
        r = len(range(*rows.indices(b)))
        kept.append(torch.empty((r, h, n, num_keys) if heads == "none" else (r, n, num_keys),
                                dtype=torch.float32, device=q.device))
    chunk = query_chunk(b, h, num_keys)
    buffer = q.new_empty(b * h * min(chunk, n) * num_keys)
    for start in range(0, n, chunk):  # no autograd: the caller answers differentiable calls with the model's kernel
        size = min(chunk, n - start)
        probs = _softmax_over(_scores_view(buffer, b, h, size, num_keys), q[:, :, start : start + size] * scale, k_t,
                              _chunk_rows(bias, start, chunk))
        torch.matmul(probs.to(v.dtype), v, out=out[:, :, start : start + size])
        for (rows, heads), dest in zip(keep, kept):
            _reduce_into(dest[..., start : start + size, :], probs[rows], heads)
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
