"""Capture on diffusion transformers (tiny PixArt, SD3, SD3.5, FLUX built from configs): the probabilities
equal an attention written out here from each attention module's own inputs (qk norms and rotary embeddings
applied as diffusers' processors document them), the joint blocks are the right slices, the model's outputs
are unchanged, and features are the blocks' image tokens on the patch grid."""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from diffprobe.architectures import build_transformer
from diffprobe.hooks import Need, ProbeRegistry, Reduce

B, T = 2, 5
GRID = {"pixart": (4, 3), "sd3": (4, 3), "sd35": (4, 3), "flux": (3, 5)}   # token grids, not square


def _call(structure, model, g):
    """Keyword arguments of one forward of the tiny `structure` on a non-square token grid."""
    h, w = GRID[structure]
    cfg = model.config
    if structure == "flux":
        ids = torch.zeros(h, w, 3)
        ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
        return dict(hidden_states=torch.randn(B, h * w, cfg.in_channels, generator=g),
                    encoder_hidden_states=torch.randn(B, T, cfg.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(B, cfg.pooled_projection_dim, generator=g),
                    timestep=torch.tensor([0.3, 0.7]), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(T, 3))
    latent = torch.randn(B, cfg.in_channels, 2 * h, 2 * w, generator=g)
    if structure == "pixart":
        return dict(hidden_states=latent, encoder_hidden_states=torch.randn(B, T, cfg.caption_channels, generator=g),
                    timestep=torch.tensor([10, 500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return dict(hidden_states=latent, encoder_hidden_states=torch.randn(B, T, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(B, cfg.pooled_projection_dim, generator=g), timestep=torch.tensor([10, 500]))


@pytest.fixture(scope="module", params=["pixart", "sd3", "sd35", "flux"])
def tiny(request):
    torch.manual_seed(0)
    model = build_transformer(request.param, tiny=True).eval().requires_grad_(False)
    for p in model.parameters():    # random weights well away from zero-initialised gates and norms
        p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3
    kwargs = _call(request.param, model, torch.Generator().manual_seed(1))
    return request.param, model, ProbeRegistry(model), kwargs


def _heads(x, attn):   # (B, n, heads * d) -> (B, heads, n, d)
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def _norm(norm, x):    # diffusers applies qk norms on (B, heads, n, d) or (B, n, heads, d): the last dim either way
    return x if norm is None else norm(x)


def explicit_probs(structure, attn, call_kwargs):
    """softmax(q k^T / sqrt(d)) over the module's full sequence, (B, heads, Q, K), built from its inputs."""
    x = call_kwargs["hidden_states"]
    ctx = call_kwargs.get("encoder_hidden_states")
    if structure == "pixart":
        q, k = _heads(attn.to_q(x), attn), _heads(attn.to_k(x if ctx is None else ctx), attn)
        bias = call_kwargs.get("attention_mask")
    else:
        q, k = _norm(attn.norm_q, _heads(attn.to_q(x), attn)), _norm(attn.norm_k, _heads(attn.to_k(x), attn))
        bias = None
        if ctx is not None:   # joint: the text stream's own projections and norms
            cq = _norm(attn.norm_added_q, _heads(attn.add_q_proj(ctx), attn))
            ck = _norm(attn.norm_added_k, _heads(attn.add_k_proj(ctx), attn))
            q, k = (torch.cat([cq, q], 2), torch.cat([ck, k], 2)) if structure == "flux" else \
                   (torch.cat([q, cq], 2), torch.cat([k, ck], 2))
        rope = call_kwargs.get("image_rotary_emb")
        if rope is not None:
            q, k = apply_rotary_emb(q, rope, sequence_dim=2), apply_rotary_emb(k, rope, sequence_dim=2)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias.unsqueeze(1)
    return scores.softmax(-1)


def _inputs_of_every_attention(probe, model, kwargs):
    seen, handles = {}, []
    for site in probe.sites.values():
        if site.is_attention and site.module not in seen:
            seen[site.module] = None
            module = model.get_submodule(site.module)
            handles.append(module.register_forward_pre_hook(
                lambda m, a, kw, path=site.module: seen.__setitem__(path, dict(kw, hidden_states=a[0] if a else
                                                                                kw["hidden_states"])),
                with_kwargs=True))
    try:
        model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("attention", ["recompute", "reuse"])
def test_probabilities_equal_explicit_attention_and_outputs_stay(tiny, attention):
    structure, model, probe, kwargs = tiny
    bare = model(**kwargs).sample
    inputs = _inputs_of_every_attention(probe, model, kwargs)
    with probe.capture(lambda s: s.is_attention, reduce=Reduce(heads="none"), attention=attention) as cache:
        out = model(**kwargs).sample
    if attention == "recompute":
        assert torch.equal(out, bare)
    torch.testing.assert_close(out, bare, rtol=0, atol=1e-5)
    h, w = GRID[structure]
    n = h * w
    for name in cache.names:
        site = probe.sites[name]
        want = explicit_probs(structure, model.get_submodule(site.module), inputs[site.module])
        if site.part is not None or site.kind == "joint_attn":
            img, txt = (slice(T, T + n), slice(0, T)) if site.text_first else (slice(0, n), slice(n, n + T))
            pick = {"img": img, "txt": txt}
            if site.part is not None:
                want = want[..., pick[site.part[:3]], :][..., pick[site.part[4:]]]
        torch.testing.assert_close(cache[name], want, rtol=0, atol=1e-5, msg=name)
        if site.kind in ("self_attn", "cross_attn"):
            assert cache.grid(name) == (h, w)


def test_blocks_are_slices_of_the_joint_map_and_rows_sum_to_one(tiny):
    structure, model, probe, kwargs = tiny
    if structure == "pixart":
        pytest.skip("PixArt has no joint attention")
    path = "transformer_blocks.0.attn"
    names = [f"{path}.hook_{p}" for p in ("probs", "img2img", "img2txt", "txt2img", "txt2txt")]
    with probe.capture(names, reduce=Reduce(heads="mean")) as cache:
        model(**kwargs)
    whole = cache[f"{path}.hook_probs"]
    n = GRID[structure][0] * GRID[structure][1]
    assert whole.shape == (B, n + T, n + T)
    torch.testing.assert_close(whole.sum(-1), torch.ones(B, n + T))
    # an image query's mass splits between image and text keys, a text query's too
    image_rows = cache[f"{path}.hook_img2img"].sum(-1) + cache[f"{path}.hook_img2txt"].sum(-1)
    text_rows = cache[f"{path}.hook_txt2img"].sum(-1) + cache[f"{path}.hook_txt2txt"].sum(-1)
    torch.testing.assert_close(image_rows, torch.ones(B, n))
    torch.testing.assert_close(text_rows, torch.ones(B, T))
    assert cache[f"{path}.hook_img2txt"].shape == (B, n, T) and cache[f"{path}.hook_txt2img"].shape == (B, T, n)
    # the memory estimate made before running, from metadata, is what the capture holds
    divisor = probe.sites[names[0]].divisor
    latent = (GRID[structure][0] * divisor, GRID[structure][1] * divisor)
    held = sum(cache[m].numel() * cache[m].element_size() for m in cache.names)
    assert probe.bytes_per_call(Need(names, Reduce(heads="mean")), latent, batch=B, tokens=T) == held
    assert cache.maps(f"{path}.hook_img2txt").shape == (B, T, *GRID[structure])   # per-token maps on the grid


def test_gradients_flow_to_the_text_and_query_upsampling_is_refused_under_rope(tiny):
    structure, model, probe, kwargs = tiny
    site = probe.select(lambda s: s.kind == "cross_attn")[0]
    ctx = kwargs["encoder_hidden_states"].clone().requires_grad_(True)
    with probe.capture(site, grad=True) as cache:
        model(**{**kwargs, "encoder_hidden_states": ctx})
    cache[site][..., 0].sum().backward()
    assert ctx.grad is not None and float(ctx.grad.abs().sum()) > 0
    if structure == "flux":
        with pytest.raises(Exception, match="upsample_queries cannot be used.*rotary embeddings"):
            with probe.capture(site, upsample_queries=8):
                pass


def test_upsampled_queries_of_the_image_to_text_block(tiny):
    # SD3: the module's image input upsampled bicubically, through its to_q and qk norm, against the call's keys;
    # the softmax over all (image and text) keys, the text columns kept; gradients reach the text
    structure, model, probe, kwargs = tiny
    if structure not in ("sd3", "sd35"):
        pytest.skip("upsampled queries at the kernel: SD3 only (PixArt recomputes them from its input like the "
                    "UNet; FLUX refuses, tested above)")
    from diffprobe.hooks.attention import upsample_tokens

    site = probe.select("*.hook_img2txt")[-1]
    attn = model.get_submodule(probe.sites[site].module)
    call = _inputs_of_every_attention(probe, model, kwargs)[probe.sites[site].module]
    x, ctx = call["hidden_states"], call["encoder_hidden_states"]
    q = _norm(attn.norm_q, _heads(attn.to_q(upsample_tokens(x, GRID[structure], (6, 5))), attn))
    k = torch.cat([_norm(attn.norm_k, _heads(attn.to_k(x), attn)),
                   _norm(attn.norm_added_k, _heads(attn.add_k_proj(ctx), attn))], 2)
    n = GRID[structure][0] * GRID[structure][1]
    want = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)[..., n:].mean(1)   # (B, 30, T)
    text = kwargs["encoder_hidden_states"].clone().requires_grad_(True)
    with probe.capture(site, upsample_queries=(6, 5), reduce=Reduce(heads="mean"), grad=True) as cache:
        out = model(**{**kwargs, "encoder_hidden_states": text}).sample
    torch.testing.assert_close(cache[site], want, rtol=0, atol=1e-5)
    assert cache.grid(site) == (6, 5) and torch.equal(out, model(**kwargs).sample)
    cache[site][..., 0].sum().backward()
    assert float(text.grad.abs().sum()) > 0


def test_features_are_the_blocks_image_tokens_and_modulation(tiny):
    structure, model, probe, kwargs = tiny
    block = probe.select("transformer_blocks.0.hook_out")[0]
    got = {}
    module = model.get_submodule("transformer_blocks.0")
    handle = module.register_forward_hook(lambda m, a, o: got.setdefault("out", o))
    try:
        with probe.capture(Need(["transformer_blocks.0.hook_*"])) as cache:
            model(**kwargs)
    finally:
        handle.remove()
    tokens = got["out"][1] if isinstance(got["out"], tuple) else got["out"]
    h, w = GRID[structure]
    feature = cache[block]
    assert feature.shape == (B, tokens.shape[-1], h, w)
    torch.testing.assert_close(feature[:, :, 1, 2], tokens[:, 1 * w + 2])   # row-major token (1, 2)
    if structure != "pixart":
        mod = cache["transformer_blocks.0.hook_modulation"]
        temb_dim = model.get_submodule("transformer_blocks.0.norm1.linear").in_features
        assert mod.shape == (B, probe.sites["transformer_blocks.0.hook_modulation"].channels) and temb_dim > 0
        assert not torch.equal(mod[0], mod[1])   # two timesteps, two modulations


def test_registry_picks_each_family(tiny):
    structure, model, probe, _ = tiny
    assert probe.backend.name == {"pixart": "pixart", "sd3": "sd3", "sd35": "sd3", "flux": "flux"}[structure]


def test_site_order_is_the_order_modules_fire(tiny):
    structure, model, probe, kwargs = tiny
    fired, handles = [], []
    for path in dict.fromkeys(s.module for s in probe.sites.values()):
        handles.append(model.get_submodule(path).register_forward_hook(lambda m, a, o, p=path: fired.append(p)))
    try:
        model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    by_order = sorted(probe.sites.values(), key=lambda s: s.order)
    assert fired == list(dict.fromkeys(s.module for s in by_order))   # a joint module's sites are consecutive


def test_layout_early_exit_and_on_step_work_on_joint_attention(tiny):
    structure, model, probe, kwargs = tiny
    if structure == "pixart":
        pytest.skip("PixArt has no joint attention")
    from diffprobe.hooks import BatchLayout

    first = "transformer_blocks.0.attn.hook_img2txt"
    with probe.capture(first, reduce=Reduce(heads="mean")) as full:
        model(**kwargs)
    seen = []
    after = []
    with probe.capture(first, reduce=Reduce(heads="mean"), layout=BatchLayout(cfg=True, keep="cond"), early_exit=True,
                       on_step=lambda step, t, tensors: seen.append((step, sorted(tensors)))) as cache:
        model(**kwargs)
        after.append("not reached")          # the forward stopped at the first block
    assert after == [] and seen == []          # early exit: the model's post-hook (on_step) never ran
    torch.testing.assert_close(cache[first], full[first][1:])   # rows [uncond; cond]: the cond half kept
    with probe.capture(first, on_step=lambda step, t, tensors: seen.append((step, float(t), list(tensors)))):
        model(**kwargs)
    assert seen == [(0, float(kwargs["timestep"][0]), [first])]


def test_blocks_alone_come_from_the_fused_kernels_normalisers_in_reuse_mode(tiny, monkeypatch):
    # only blocks of the joint maps wanted: the fused kernel gives the output and each row's log normaliser, and
    # just the blocks' scores are computed; they equal the blocks sliced from the recomputed whole map
    structure, model, probe, kwargs = tiny
    if structure == "pixart":
        pytest.skip("PixArt has no joint attention")
    import diffprobe.hooks.capture as capture_module

    calls = []
    real = capture_module.attention_with_lse
    monkeypatch.setattr(capture_module, "attention_with_lse", lambda *a: calls.append(1) or real(*a))
    needs = lambda: [Need("*.hook_img2txt", Reduce(heads="mean")),  # noqa: E731
                     Need(["*.hook_txt2img", "*.hook_img2txt"], Reduce(heads="none"), rows=(1, 2))]
    bare = model(**kwargs).sample
    with probe.capture(needs()) as exact:
        model(**kwargs)
    with probe.capture(needs(), attention="reuse") as reused:
        out = model(**kwargs).sample
    assert len(calls) == len({probe.sites[n].module for n in probe.select("*.hook_img2txt")})
    torch.testing.assert_close(out, bare, rtol=0, atol=1e-5)
    for a, b in zip(exact, reused):
        assert a.names == b.names
        for name in a.names:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
