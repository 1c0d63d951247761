"""Capture: values equal diffusers' own attention scores, outputs unchanged, gradients, cleanup, CFG, steps."""

import pytest
import torch
import torch.nn.functional as F

from diffprobe.loading import tiny_backbone
from diffprobe.hooks import BatchLayout, Need, ProbeRegistry, Reduce
from diffprobe.drives import Conditioning, encode_prompt, unet_call

SITE_SELF = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.hook_probs"


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def setup(request):
    bb = tiny_backbone(request.param)
    probe = ProbeRegistry(bb.unet)
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 8, 8)
    cond = encode_prompt(bb, ["a cat", "a dog"])
    return bb, probe, latents, cond


def _inputs_of(modules, fn):
    """Run fn() once and return, per module, the (hidden, context) it was called with."""
    seen = {}
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen.__setitem__(
                i, (args[0] if args else kwargs["hidden_states"], kwargs.get("encoder_hidden_states"))),
            with_kwargs=True)
        for i, m in enumerate(modules)
    ]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in range(len(modules))]


def _diffusers_scores(attn, hidden, context):
    """Attention.get_attention_scores on diffusers' own (batch*heads) layout -> (B, heads, N, K)."""
    source = hidden if context is None else context
    q = attn.head_to_batch_dim(attn.to_q(hidden))
    k = attn.head_to_batch_dim(attn.to_k(source))
    probs = attn.get_attention_scores(q.float(), k.float())
    return probs.view(hidden.shape[0], attn.heads, *probs.shape[1:])


def test_probs_equal_diffusers_scores(setup):
    bb, probe, latents, cond = setup
    names = probe.select("*.hook_probs")
    with probe.capture(names, reduce=Reduce(heads="none")) as cache:
        unet_call(bb, latents, 50, cond)
    checked = names[:: max(1, len(names) // 8)] + [names[-1]]
    modules = [bb.unet.get_submodule(probe.sites[n].module) for n in checked]
    inputs = _inputs_of(modules, lambda: unet_call(bb, latents, 50, cond))
    for name, attn, (hidden, context) in zip(checked, modules, inputs):
        expected = _diffusers_scores(attn, hidden, context if probe.sites[name].kind == "cross_attn" else None)
        assert cache[name].shape == expected.shape
        torch.testing.assert_close(cache[name], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[name].sum(-1), torch.ones(expected.shape[:-1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 5e-3)])
def test_probs_equal_diffusers_scores_in_the_models_dtype(dtype, atol):
    # the capture recomputes in fp32 from the module's own q and k; diffusers' scores in fp16/bf16 carry
    # that dtype's rounding (measured on this model: 4e-8 fp32, 2e-4 fp16, 2e-3 bf16 at most)
    bb = tiny_backbone("sd15", dtype=dtype)
    probe = ProbeRegistry(bb.unet)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    cond = encode_prompt(bb, ["a cat", "a dog"])
    names = probe.select("*.hook_probs")
    modules = [bb.unet.get_submodule(probe.sites[n].module) for n in names]
    with probe.capture(names, reduce=Reduce(heads="none")) as cache:
        inputs = _inputs_of(modules, lambda: unet_call(bb, latents, 50, cond))
    worst = 0.0
    for name, attn, (hidden, context) in zip(names, modules, inputs):
        source = context if probe.sites[name].kind == "cross_attn" else hidden
        q, k = attn.head_to_batch_dim(attn.to_q(hidden)), attn.head_to_batch_dim(attn.to_k(source))
        expected = attn.get_attention_scores(q, k).view(hidden.shape[0], attn.heads, q.shape[1], k.shape[1])
        assert cache[name].dtype == torch.float32
        worst = max(worst, (cache[name] - expected.float()).abs().max().item())
    assert worst <= atol
    assert dtype == torch.float32 or worst > 1e-6  # the low-precision scores really do differ


def test_head_reductions_agree(setup):
    bb, probe, latents, cond = setup
    name = probe.select("*.attn2.hook_probs")[0]
    results = {}
    for heads in ("none", "mean", "sum", 1):
        with probe.capture(name, reduce=Reduce(heads=heads)) as cache:
            unet_call(bb, latents, 50, cond)
        results[heads] = cache[name]
    torch.testing.assert_close(results["mean"], results["none"].mean(1))
    torch.testing.assert_close(results["sum"], results["none"].sum(1))
    torch.testing.assert_close(results[1], results["none"][:, 1])


def test_outputs_identical_with_and_without_capture(setup):
    bb, probe, latents, cond = setup
    bare = unet_call(bb, latents, 50, cond)
    with probe.capture("*", reduce=Reduce(heads="none")):
        captured = unet_call(bb, latents, 50, cond)
    assert torch.equal(bare, captured)


def test_gradients_reach_the_context(setup):
    bb, probe, latents, _ = setup
    context = torch.randn(1, 6, bb.context_dim, requires_grad=True)
    added = encode_prompt(bb, [""]).added
    names = probe.select("up_blocks.*.attn2.hook_probs")
    with probe.capture(names, grad=True) as cache:
        unet_call(bb, latents[:1], 50, Conditioning(context, added))
    loss = sum((cache[n][..., 2] ** 2).sum() for n in names)
    loss.backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    with probe.capture(names, grad=False) as cache:
        unet_call(bb, latents[:1], 50, Conditioning(context, added))
    assert not cache[names[0]].requires_grad


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_cleanup_after_exception_keeps_user_hooks(setup):
    bb, probe, latents, cond = setup
    user_calls = []
    user = bb.unet.conv_out.register_forward_hook(lambda *a: user_calls.append(1))
    before = _hook_count(bb.unet)
    with pytest.raises(RuntimeError, match="boom"):
        with probe.capture("*"):
            assert _hook_count(bb.unet) > before
            raise RuntimeError("boom")
    assert _hook_count(bb.unet) == before
    unet_call(bb, latents, 50, cond)
    assert user_calls == [1]
    user.remove()


def test_captures_nest(setup):
    bb, probe, latents, cond = setup
    self_name, cross_name = probe.select("*.attn1.hook_probs")[0], probe.select("*.attn2.hook_probs")[-1]
    with probe.capture(self_name) as outer:
        with probe.capture([self_name, cross_name]) as inner:
            unet_call(bb, latents, 50, cond)
        unet_call(bb, latents, 70, cond)
    assert inner.timesteps == [50.0] and outer.timesteps == [50.0, 70.0]
    assert inner.names == [self_name, cross_name] and outer.names == [self_name]
    with probe.capture(self_name) as again:
        unet_call(bb, latents, 70, cond)
    torch.testing.assert_close(outer[self_name], again[self_name])


def test_cfg_half_is_the_cond_rows(setup):
    bb, probe, latents, cond = setup
    uncond = encode_prompt(bb, ["", ""])
    both = Conditioning.cat([uncond, cond])
    name = probe.select("*.attn2.hook_probs")[-1]
    with probe.capture(name, layout=BatchLayout(cfg=True, uncond_first=True, keep="cond")) as cache:
        unet_call(bb, torch.cat([latents, latents]), 50, both)
    with probe.capture(name) as alone:
        unet_call(bb, latents, 50, cond)
    torch.testing.assert_close(cache[name], alone[name], atol=1e-5, rtol=0)
    with probe.capture(name, layout=BatchLayout(cfg=True, uncond_first=False, keep="uncond")) as swapped:
        unet_call(bb, torch.cat([latents, latents]), 50, Conditioning.cat([cond, uncond]))
    with probe.capture(name) as uncond_alone:
        unet_call(bb, latents, 50, uncond)
    torch.testing.assert_close(swapped[name], uncond_alone[name], atol=1e-5, rtol=0)


def test_query_upsampling_shape_and_values():
    bb = tiny_backbone("sd15")
    probe = ProbeRegistry(bb.unet)
    latents, cond = torch.randn(1, 4, 8, 8), encode_prompt(bb, ["a bird"])
    name = "up_blocks.2.attentions.0.transformer_blocks.0.attn2.hook_probs"  # 2x2 at 8x8 latents
    with probe.capture(name, upsample_queries=(6, 10)) as cache:
        unet_call(bb, latents, 50, cond)
    assert cache[name].shape == (1, 60, bb.max_tokens) and cache.grid(name) == (6, 10)
    attn = bb.unet.get_submodule(probe.sites[name].module)
    [(hidden, context)] = _inputs_of([attn], lambda: unet_call(bb, latents, 50, cond))
    h = int(hidden.shape[1] ** 0.5)
    grid = hidden.transpose(1, 2).reshape(1, -1, h, h)
    up = F.interpolate(grid, size=(6, 10), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    expected = _diffusers_scores(attn, up, context).mean(1)
    torch.testing.assert_close(cache[name], expected, atol=1e-5, rtol=0)
    with probe.capture(name, upsample_queries=h) as same, probe.capture(name) as plain:
        unet_call(bb, latents, 50, cond)
    torch.testing.assert_close(same[name], plain[name], atol=1e-5, rtol=0)  # upsampling to its own grid is identity


def test_query_upsampling_in_bfloat16_with_gradients_matches_float32():
    """A bf16 model's upsampled queries (a keypoint fit's maps: gradients to the context) go through its bf16
    projections: the maps are those of the fp32 model to bf16 rounding, and the gradient reaches the context."""
    name = "up_blocks.2.attentions.0.transformer_blocks.0.attn2.hook_probs"
    maps = {}
    for dtype in (torch.float32, torch.bfloat16):
        bb = tiny_backbone("sd15", dtype=dtype)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
        cond = encode_prompt(bb, ["a bird"])
        context = cond.context.detach().requires_grad_(True)
        with torch.enable_grad(), bb.probe.capture(name, upsample_queries=(16, 16), grad=True) as cache:
            unet_call(bb, latents, 50, Conditioning(context))
            cache[name][..., 1].sum().backward()   # one token's map (a whole row sums to 1)
        assert context.grad is not None and context.grad.abs().sum() > 0
        maps[dtype] = cache[name].detach().float()
    torch.testing.assert_close(maps[torch.bfloat16], maps[torch.float32], atol=2e-2, rtol=0)


def test_steps_all_list_mean_and_callback():
    bb = tiny_backbone("sd15")
    probe = ProbeRegistry(bb.unet)
    latents, cond = torch.randn(1, 4, 8, 8), encode_prompt(bb, [""])
    name = "up_blocks.1.resnets.0.hook_residual"
    seen = []
    caches = {}
    for steps in ("all", [0, 2], "mean", "last"):
        cb = (lambda i, t, d: seen.append((i, t, tuple(d)))) if steps == "last" else None
        with probe.capture(name, reduce=Reduce(steps=steps), on_step=cb) as cache:
            for t in (10, 20, 30):
                unet_call(bb, latents, t, cond)
        caches[str(steps)] = cache
    full = caches["all"][name]
    assert full.shape[0] == 3 and caches["all"].timesteps == [10.0, 20.0, 30.0]
    torch.testing.assert_close(caches["[0, 2]"][name], full[[0, 2]])
    torch.testing.assert_close(caches["[0, 2]"].step(name, 2), full[2])
    torch.testing.assert_close(caches["mean"][name], full.mean(0))
    torch.testing.assert_close(caches["last"][name], full[2])
    assert seen == [(0, 10.0, (name,)), (1, 20.0, (name,)), (2, 30.0, (name,))]


def test_early_exit_stops_the_forward():
    bb = tiny_backbone("sd15")
    probe = ProbeRegistry(bb.unet)
    ran_out = []
    handle = bb.unet.conv_out.register_forward_hook(lambda *a: ran_out.append(1))
    after = []
    with probe.capture("down_blocks.1.hook_out", early_exit=True) as cache:
        unet_call(bb, torch.randn(1, 4, 8, 8), 10, encode_prompt(bb, [""]))
        after.append(1)
    handle.remove()
    assert ran_out == [] and after == [] and cache["down_blocks.1.hook_out"].shape == (1, 32, 2, 2)


def test_an_inner_early_exit_does_not_cut_an_outer_capture_short():
    bb = tiny_backbone("sd15")
    x, cond = torch.randn(1, 4, 8, 8), encode_prompt(bb, ["a cat"])
    with ProbeRegistry(bb.unet).capture("up_blocks.*.attn2.hook_probs") as bare:
        expected = unet_call(bb, x, 10, cond)
    after = []
    with ProbeRegistry(bb.unet).capture("up_blocks.*.attn2.hook_probs") as outer:
        with ProbeRegistry(bb.unet).capture("down_blocks.1.hook_out", early_exit=True) as inner:
            out = unet_call(bb, x, 10, cond)
            after.append(1)  # the forward ran to its end, so the inner block goes on
    assert after == [1] and torch.equal(out, expected) and inner["down_blocks.1.hook_out"].shape == (1, 32, 2, 2)
    assert outer.names == bare.names and len(bare.names) == 9  # every up-path cross-attention
    assert all(torch.equal(outer[k], bare[k]) for k in bare.names)
    with ProbeRegistry(bb.unet).capture("down_blocks.1.hook_out", early_exit=True) as again:  # alone: stops again
        unet_call(bb, x, 10, cond)
        after.append(2)
    assert after == [1] and "down_blocks.1.hook_out" in again


def test_storage_dtype_and_unsupported_attention_is_refused():
    bb = tiny_backbone("sd15")
    probe = ProbeRegistry(bb.unet)
    with probe.capture(SITE_SELF, dtype=torch.float16) as cache:
        unet_call(bb, torch.randn(1, 4, 8, 8), 10, encode_prompt(bb, [""]))
    assert cache[SITE_SELF].dtype == torch.float16
    attn = bb.unet.get_submodule(probe.sites[SITE_SELF].module)
    attn.norm_q = torch.nn.LayerNorm(8)
    try:
        with pytest.raises(ValueError, match="norm_q"):
            with probe.capture(SITE_SELF):
                pass
    finally:
        attn.norm_q = None


@pytest.mark.parametrize("attention", ["recompute", "reuse"])
def test_encoder_attention_mask_is_applied(attention):
    """A mask on the tokens (the UNet's encoder_attention_mask) zeroes their probabilities, rows still sum to 1,
    and in reuse mode the masked output equals the uncaptured masked call."""
    bb = tiny_backbone("sd15")
    probe = ProbeRegistry(bb.unet)
    cond = encode_prompt(bb, ["a cat"])
    mask = torch.ones(1, bb.max_tokens)
    mask[:, 5:] = 0
    name = probe.select("*.attn2.hook_probs")[0]
    latents = torch.randn(1, 4, 8, 8)
    call = lambda: bb.unet(latents, 10, encoder_hidden_states=cond.context, encoder_attention_mask=mask).sample  # noqa: E731
    bare = call()
    with probe.capture(name, attention=attention) as cache:
        out = call()
    probs = cache[name]
    assert float(probs[..., 5:].abs().max()) < 1e-6
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    torch.testing.assert_close(out, bare, rtol=0, atol=1e-5)


def test_reuse_refuses_a_processor_that_does_not_call_sdpa(setup):
    bb, probe, latents, cond = setup
    from diffusers.models.attention_processor import AttnProcessor

    from diffprobe.hooks import UnsupportedAttention

    before = dict(bb.unet.attn_processors)
    bb.unet.set_attn_processor(AttnProcessor())   # explicit bmm attention: no SDPA call to answer
    try:
        with pytest.raises(UnsupportedAttention, match="AttnProcessor called scaled_dot_product_attention 0 times"):
            with probe.capture("*.attn1.hook_probs", attention="reuse"):   # self-attention is answered at SDPA
                unet_call(bb, latents, 50, cond)
    finally:
        bb.unet.set_attn_processor(before)


@pytest.mark.parametrize("heads", ["mean", "none", 1])
def test_reused_probabilities_equal_recomputed_ones_and_outputs_stay(setup, heads):
    # attention="reuse": the probabilities the layer's output is computed from are kept; a second need on other
    # rows is served in the same capture; the processors are never swapped
    bb, probe, latents, cond = setup

    bare = unet_call(bb, latents, 50, cond)
    needs = lambda: [Need("*.hook_probs", Reduce(heads=heads)),  # noqa: E731
                     Need("up_blocks.*.attn2.hook_probs", Reduce(heads="sum"), rows=(1, 2))]
    with probe.capture(needs(), attention="recompute") as exact:
        unet_call(bb, latents, 50, cond)
    attn = bb.unet.get_submodule(probe.sites[probe.select("*.attn1.hook_probs")[0]].module)
    processor = attn.processor
    with probe.capture(needs(), attention="reuse") as reused:
        out = unet_call(bb, latents, 50, cond)
    assert attn.processor is processor and not attn._forward_hooks and not attn._forward_pre_hooks
    torch.testing.assert_close(out, bare, rtol=0, atol=1e-5)
    for a, b in zip(exact, reused):
        assert a.names == b.names
        for name in a.names:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)


def test_reuse_keeps_the_model_differentiable(setup):
    # a forward whose attention inputs need gradients is answered by the model's own kernel (the explicit kernel
    # writes into preallocated buffers, outside autograd); the maps are still kept, detached
    bb, probe, latents, cond = setup
    x = latents.clone().requires_grad_(True)
    unet_call(bb, x, 50, cond).square().sum().backward()
    want = x.grad.clone()
    x.grad = None
    with probe.capture("*.attn1.hook_probs", attention="recompute") as exact:
        unet_call(bb, latents, 50, cond)
    with probe.capture("*.attn1.hook_probs", attention="reuse") as reused:
        unet_call(bb, x, 50, cond).square().sum().backward()
    torch.testing.assert_close(x.grad, want, rtol=0, atol=1e-6)
    for name in exact.names:
        assert not reused[name].requires_grad
        torch.testing.assert_close(reused[name], exact[name], rtol=0, atol=1e-5)


def test_reuse_leaves_no_mode_or_hook_behind_when_the_forward_raises(setup):
    bb, probe, latents, cond = setup
    from torch.overrides import _get_current_function_mode_stack

    attn = bb.unet.get_submodule(probe.sites[probe.select("*.attn1.hook_probs")[-1]].module)
    boom = attn.to_out[0].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):   # raised inside the module, while its mode is active
            with probe.capture("*.attn1.hook_probs", attention="reuse"):
                unet_call(bb, latents, 50, cond)
    finally:
        boom.remove()
    assert not _get_current_function_mode_stack()
    assert not attn._forward_hooks and not attn._forward_pre_hooks
    torch.testing.assert_close(unet_call(bb, latents, 50, cond), unet_call(bb, latents, 50, cond), rtol=0, atol=0)
    with pytest.raises(Exception, match="attention must be one of"):
        with probe.capture("*.attn2.hook_probs", attention="fused"):
            pass


def test_capture_options_are_the_fields_of_a_need():
    bb = tiny_backbone("sd15")
    probe = ProbeRegistry(bb.unet)
    x, cond = torch.randn(1, 4, 8, 8), encode_prompt(bb, ["a cat"])
    with probe.capture(SITE_SELF, reduce=Reduce(heads="sum"), grad=False) as a:
        unet_call(bb, x, 10, cond)
    with probe.capture(Need(SITE_SELF, reduce=Reduce(heads="sum"))) as b:
        unet_call(bb, x, 10, cond)
    assert torch.equal(a[SITE_SELF], b[SITE_SELF])
    with pytest.raises(TypeError, match="set them in the Needs"):
        with probe.capture([Need(SITE_SELF)], reduce=Reduce(heads="sum")):
            pass
