"""Symmetric KL distance between rows of two row-stochastic matrices, in matrix form and chunked.

D(p, q) = (KL(p||q) + KL(q||p)) / 2
        = 0.5 * (H_p - p . log q + H_q - q . log p),   H_p = sum p log p.
The cross terms are two matrix products, so an (n, m) distance table costs O(n m D) multiply-adds
and O((n + chunk) D) memory, instead of the (n, m, D) tensor that broadcasting builds.

With eps=0 there is no clamp, as in the reference: a zero probability gives log 0 = -inf and
0 * -inf = NaN in that row's entropy, so every distance involving a map with a zero is NaN (and
NaN < tau is False: such pairs are never close). `fp16=True` also rounds the maps and their logs
to float16 first, as the reference's iteration 0 does (`tf.cast(..., tf.float16)`): probabilities
below float16's smallest subnormal (2^-24, about 6e-8) become exactly 0.
"""

from __future__ import annotations

import torch

from diffprobe.errors import DiffprobeError

DEFAULT_EPS = 1e-12


def _as_fp16(x: torch.Tensor, fp16: bool) -> torch.Tensor:
    """x rounded to float16 values but kept in its dtype (products and sums then run at x's precision:
    the float16 inputs are emulated, float16 accumulation is not)."""
    return x.half().to(x.dtype) if fp16 else x


def _log_and_entropy(x: torch.Tensor, eps: float, fp16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """log(clamp(x, eps)) (same shape, rounded to float16 values with fp16) and the row sums of
    x * that log, shape (rows,)."""
    log_x = _as_fp16(x.clamp_min(eps).log(), fp16)
    return log_x, (x * log_x).sum(dim=1)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor | None = None, eps: float = DEFAULT_EPS,
                 chunk: int = 1024, fp16: bool = False) -> torch.Tensor:
    """Distances between every row of p (n, D) and every row of q (m, D); returns (n, m).

    q=None means q=p. Rows should each sum to 1; probabilities are clamped to `eps` before the log
    (eps=0: no clamp, NaN for maps with zeros). The rows of q are processed `chunk` at a time.
    Computed in the dtype of p (use float64 for reference-grade numbers; float32 is accurate to
    ~1e-5 for 4096-pixel maps); fp16 rounds the inputs and logs to float16 first (module docstring).
    """
    if p.dim() != 2:
        raise DiffprobeError(f"p must be (n, D), got shape {tuple(p.shape)}")
    q = p if q is None else q.to(p.dtype)
    if q.dim() != 2 or q.shape[1] != p.shape[1]:
        raise DiffprobeError(f"q must be (m, {p.shape[1]}), got shape {tuple(q.shape)}")
    p = _as_fp16(p, fp16)
    log_p, h_p = _log_and_entropy(p, eps, fp16)
    out = torch.empty(p.shape[0], q.shape[0], dtype=p.dtype, device=p.device)
    for start in range(0, q.shape[0], chunk):
        qc = _as_fp16(q[start:start + chunk], fp16)
        log_q, h_q = _log_and_entropy(qc, eps, fp16)
        cross = p @ log_q.T
        cross += log_p @ qc.T
        out[:, start:start + chunk] = 0.5 * (h_p[:, None] + h_q[None, :] - cross)
    return out
