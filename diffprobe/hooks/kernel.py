"""Answering a module's scaled_dot_product_attention call with a kernel of diffprobe's, for one forward.

How attention is captured where the probabilities cannot be recomputed from the module's inputs alone
(diffusion transformers: qk norms, rotary embeddings, joint sequences) and for capture(attention="reuse"):
a forward pre-hook on the attention module enters a TorchFunctionMode that
hands the module's call of torch.nn.functional.scaled_dot_product_attention, with the exact q, k, v, mask and
scale the model's processor built (qk norms, rotary embeddings and all), to `kernel`; a forward hook that
PyTorch runs also when the forward raises leaves the mode. Every other torch call passes through untouched,
and no module, processor or diffusers function is replaced.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from diffprobe.hooks.errors import UnsupportedAttention

# kernel(q (B, h, N, d), k (B, h, K, d), v (B, h, K, dv), bias broadcastable to (B, h, N, K) or None, scale,
# original) -> the attention output (B, h, N, dv); original() runs the model's own SDPA call unchanged.
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float,
                   Callable[[], torch.Tensor]], torch.Tensor]

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def additive_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """SDPA's attn_mask as a bias to add to the scores: a boolean mask (True = attend) becomes 0 / -inf."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class _Answer(TorchFunctionMode):
    """Routes scaled_dot_product_attention calls to `kernel` and counts them."""

    def __init__(self, name: str, kernel: Kernel):
        super().__init__()
        self.name, self.kernel, self.calls = name, kernel, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = {**dict(zip(_SDPA_ARGS, args)), **kwargs}
        if call.get("dropout_p") or call.get("is_causal") or call.get("enable_gqa"):
            raise UnsupportedAttention(f"cannot capture the attention of {self.name}: it calls "
                                       "scaled_dot_product_attention with dropout, a causal mask or grouped "
                                       "queries, which capture does not reproduce")
        self.calls += 1
        q = call["query"]
        scale = call.get("scale")
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return self.kernel(q, call["key"], call["value"], additive_bias(call.get("attn_mask"), q.dtype), scale,
                           lambda: func(*args, **kwargs))


def answer_attention(module: nn.Module, name: str, kernel: Kernel) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks on `module` (the site `name`) under which its one scaled_dot_product_attention call per forward is
    answered by `kernel`; remove the returned handles to undo. A forward whose processor makes no such call
    (xformers, sliced or custom processors), or several, raises UnsupportedAttention."""
    modes: list[_Answer] = []

    def pre(mod, args, kwargs):
        modes.append(_Answer(name, kernel))
        modes[-1].__enter__()

    def post(mod, args, kwargs, output):
        mode = modes.pop()
        mode.__exit__(None, None, None)
        if mode.calls != 1 and sys.exc_info()[0] is None:
            processor = type(getattr(mod, "processor", None)).__name__
            raise UnsupportedAttention(
                f"cannot capture the attention of {name} at its kernel: its processor {processor} "
                f"called scaled_dot_product_attention {mode.calls} times in one forward (once is needed); set "
                "diffusers' default attention processor, or capture UNet attention with attention='recompute'")

    return [module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True, always_call=True)]
