"""The reuse kernel: an explicit, query-chunked attention answering a module's SDPA call, checked against an
attention written out with einsum on planted tensors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffprobe.hooks import UnsupportedAttention
from diffprobe.hooks import attention as attention_module
from diffprobe.hooks.attention import attend_keeping
from diffprobe.hooks.kernel import answer_attention


def explicit(q, k, v, mask, scale):
    scores = torch.einsum("bhnd,bhkd->bhnk", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.einsum("bhnk,bhkd->bhnd", probs, v), probs


class SDPAModule(nn.Module):
    """A module whose forward calls SDPA with a boolean mask and an explicit scale, like a processor does."""

    def __init__(self, calls: int = 1):
        super().__init__()
        self.calls = calls

    def forward(self, q, k, v, mask):
        out = q
        for _ in range(self.calls):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        return out * 2


@pytest.fixture
def planted():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 10, 8, generator=g) for _ in range(3))
    v = v[..., :6]                                       # dv != d
    mask = torch.rand(3, 1, 1, 10, generator=g) > 0.3    # per image, masked keys
    mask[..., 0] = True
    return q, k, v, mask


def test_chunked_attention_keeps_the_probabilities_it_uses(planted, monkeypatch):
    q, k, v, mask = planted
    monkeypatch.setattr(attention_module, "HEAD_CHUNK_ELEMENTS", 3 * 10)   # 3 queries per chunk: 4 chunks
    want_out, want_probs = explicit(q, k, v, mask, 0.3)
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    out, (mean, one_head, every) = attend_keeping(q, k, v, bias, 0.3,
                                                  [(slice(0, 3), "mean"), (slice(1, 2), 2), (slice(2, 3), "none")])
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(mean, want_probs.mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(one_head, want_probs[1:2, 2], rtol=0, atol=1e-6)
    torch.testing.assert_close(every, want_probs[2:3], rtol=0, atol=1e-6)
    assert float(mean[..., ~mask[0, 0, 0]][:1].abs().max()) == 0.0


@pytest.mark.parametrize("keep", [True, False])
def test_probabilities_with_gradients_kept_or_recomputed_give_the_explicit_values_and_gradients(planted, monkeypatch,
                                                                                               keep):
    """With gradients the chunks either keep their probabilities for the backward or are checkpointed (recomputed
    in it); both give the explicit softmax's head mean and, through a planted loss on two keys, its gradients."""
    q, k, _, mask = planted
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", 3 * 4 * 3 * 10)   # 3 queries per chunk: 4 chunks
    monkeypatch.setattr(attention_module, "KEEP_FOR_BACKWARD_BYTES", (1 << 30) if keep else 0)
    checkpoints = []
    checkpoint = attention_module.checkpoint
    monkeypatch.setattr(attention_module, "checkpoint", lambda *a, **kw: checkpoints.append(1) or checkpoint(*a, **kw))
    weights = torch.linspace(-1, 1, 3 * 10 * 2).reshape(3, 10, 2)
    grads = []
    for explicit_path in (True, False):
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        probs = (explicit(qq, kk, kk, mask, 1.0)[1].mean(1) if explicit_path
                 else attention_module.probs_from_qk(qq, kk, bias, "mean", grad=True))
        assert probs.requires_grad
        (probs[..., 3:5] * weights).sum().backward()
        grads.append((probs.detach(), qq.grad, kk.grad))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert len(checkpoints) == (0 if keep else 4)


def test_answered_module_gives_the_kernels_output_and_leaves_nothing_behind(planted):
    q, k, v, mask = planted
    module = SDPAModule()
    seen = {}

    def kernel(q_, k_, v_, bias, scale, original):
        seen.update(bias=bias, scale=scale, original=original())
        out, _ = attend_keeping(q_, k_, v_, bias, scale, [])
        return out

    handles = answer_attention(module, "m", kernel)
    out = module(q, k, v, mask)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out, 2 * explicit(q, k, v, mask, 0.3)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["original"], F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3))
    assert seen["scale"] == 0.3 and seen["bias"].dtype == q.dtype           # boolean mask made additive
    assert torch.equal(torch.isinf(seen["bias"]), ~mask)
    assert not module._forward_hooks and not module._forward_pre_hooks


def test_a_module_calling_sdpa_twice_is_refused(planted):
    q, k, v, mask = planted
    module = SDPAModule(calls=2)
    answer_attention(module, "twice", lambda q_, k_, v_, bias, scale, original: attend_keeping(q_, k_, v_, bias, scale, [])[0])
    with pytest.raises(UnsupportedAttention, match="twice at its kernel: .* called scaled_dot_product_attention 2 times"):
        module(q, k, v, mask)
