"""Capture on every registered diffusion-transformer family (tiny models built from its configs, called through
the family with its own prompt conditioning): the probabilities equal an attention written out here from each
attention module's own inputs (qk norms and rotary embeddings applied as diffusers' processors document them), the
joint blocks are the right slices, the model's outputs are unchanged, and features are the blocks' image tokens on
the patch grid. A new family is tested here by registering it."""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from diffprobe.families import FAMILIES, Conditioning
from diffprobe.hooks import Need, Reduce
from diffprobe.loading import tiny_backbone

B = 2
GRID = (3, 5)   # a token grid, not square
TRANSFORMERS = [s for f in FAMILIES if f.denoiser_folder == "transformer" for s in f.tiny_configs]


class Tiny:
    """A registered transformer family's tiny model with random weights well away from zero-initialised gates and
    norms, its registry, and one call of it through the family (prompt conditioning of two prompts, latents of a
    non-square grid, two timesteps); call(context=...) replaces the text states."""

    def __init__(self, structure: str):
        torch.manual_seed(0)
        self.bb = bb = tiny_backbone(structure)
        self.structure, self.family, self.model, self.probe = structure, bb.family, bb.unet, bb.probe
        for p in self.model.parameters():
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3
        g = torch.Generator().manual_seed(1)
        factor = 2   # latent pixels per token side: a patch of 2 (PixArt, SD3, AuraFlow) or FLUX's 2 x 2 packing
        self.latents = torch.randn(B, bb.vae.config.latent_channels, factor * GRID[0], factor * GRID[1], generator=g)
        with torch.no_grad():
            self.cond = bb.family.encode_prompt(bb, ["a cat", "a dog"], (64, 64))
        self.t = torch.tensor([100.0, 700.0])

    def __call__(self, context: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.cond if context is None else Conditioning(context, self.cond.added)
        return self.family.denoise(self.model, self.latents, self.t, cond)

    def first(self, kind: str) -> str:
        return self.probe.select(lambda s: s.kind == kind)[0]


@pytest.fixture(scope="module", params=TRANSFORMERS)
def tiny(request):
    with torch.no_grad():
        yield Tiny(request.param)


def _heads(x, attn):   # (B, n, heads * d) -> (B, heads, n, d)
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def _norm(norm, x):    # diffusers applies qk norms on (B, heads, n, d) or (B, n, heads, d): the last dim either way
    return x if norm is None else norm(x)


def explicit_probs(family, site, attn, call_kwargs):
    """softmax(q k^T / sqrt(d)) over the module's full sequence, (B, heads, Q, K), built from its inputs (a joint
    module's text stream first or last as the site says)."""
    x = call_kwargs["hidden_states"]
    ctx = call_kwargs.get("encoder_hidden_states")
    if not family.captures_at_kernel:   # PixArt's attention, as the UNet's
        q, k = _heads(attn.to_q(x), attn), _heads(attn.to_k(x if ctx is None else ctx), attn)
        bias = call_kwargs.get("attention_mask")
    else:
        q, k = _norm(attn.norm_q, _heads(attn.to_q(x), attn)), _norm(attn.norm_k, _heads(attn.to_k(x), attn))
        bias = None
        if ctx is not None:   # joint: the text stream's own projections and norms
            cq = _norm(attn.norm_added_q, _heads(attn.add_q_proj(ctx), attn))
            ck = _norm(attn.norm_added_k, _heads(attn.add_k_proj(ctx), attn))
            q, k = (torch.cat([cq, q], 2), torch.cat([ck, k], 2)) if site.text_first else \
                   (torch.cat([q, cq], 2), torch.cat([k, ck], 2))
        rope = call_kwargs.get("image_rotary_emb")
        if rope is not None:
            q, k = apply_rotary_emb(q, rope, sequence_dim=2), apply_rotary_emb(k, rope, sequence_dim=2)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + (bias.unsqueeze(1) if bias.dim() == 3 else bias[:, None, None, :])
    return scores.softmax(-1)


def _inputs_of_every_attention(tiny):
    seen, handles = {}, []
    for site in tiny.probe.sites.values():
        if site.is_attention and site.module not in seen:
            seen[site.module] = None
            module = tiny.model.get_submodule(site.module)
            handles.append(module.register_forward_pre_hook(
                lambda m, a, kw, path=site.module: seen.__setitem__(path, dict(kw, hidden_states=a[0] if a else
                                                                                kw["hidden_states"])),
                with_kwargs=True))
    try:
        tiny()
    finally:
        for h in handles:
            h.remove()
    return seen


def scale(x: torch.Tensor) -> float:
    """The largest magnitude of `x`, at least 1: float rounding grows with it (AuraFlow's random output is ~500)."""
    return max(1.0, float(x.abs().max()))


def _n(tiny) -> int:
    return GRID[0] * GRID[1]


@pytest.mark.parametrize("attention", ["recompute", "reuse"])
def test_probabilities_equal_explicit_attention_and_outputs_stay(tiny, attention):
    bare = tiny()
    inputs = _inputs_of_every_attention(tiny)
    with tiny.probe.capture(lambda s: s.is_attention, reduce=Reduce(heads="none"), attention=attention) as cache:
        out = tiny()
    if attention == "recompute":
        assert torch.equal(out, bare)
    torch.testing.assert_close(out, bare, rtol=0, atol=1e-5 * scale(bare))   # reuse: float rounding of the output
    n = _n(tiny)
    for name in cache.names:
        site = tiny.probe.sites[name]
        want = explicit_probs(tiny.family, site, tiny.model.get_submodule(site.module), inputs[site.module])
        if site.part is not None or site.kind == "joint_attn":
            text = tiny.family.text_tokens(tiny.bb)
            img, txt = (slice(text, text + n), slice(0, text)) if site.text_first else (slice(0, n), slice(n, n + text))
            assert want.shape[-1] == n + text, name        # the text length the sites record is the call's
            pick = {"img": img, "txt": txt}
            if site.part is not None:
                want = want[..., pick[site.part[:3]], :][..., pick[site.part[4:]]]
        torch.testing.assert_close(cache[name], want, rtol=0, atol=1e-5, msg=name)
        if site.kind in ("self_attn", "cross_attn"):
            assert cache.grid(name) == GRID


def _joint(tiny) -> str:
    if not tiny.probe.select(lambda s: s.kind == "joint_attn"):
        pytest.skip(f"{tiny.structure} has no joint attention")
    return tiny.probe.sites[tiny.first("joint_attn")].module


def test_blocks_are_slices_of_the_joint_map_and_rows_sum_to_one(tiny):
    path = _joint(tiny)
    names = [f"{path}.hook_{p}" for p in ("probs", "img2img", "img2txt", "txt2img", "txt2txt")]
    with tiny.probe.capture(names, reduce=Reduce(heads="mean")) as cache:
        tiny()
    whole = cache[f"{path}.hook_probs"]
    n, text = _n(tiny), tiny.probe.sites[names[0]].text_tokens
    assert whole.shape == (B, n + text, n + text)
    torch.testing.assert_close(whole.sum(-1), torch.ones(B, n + text))
    # an image query's mass splits between image and text keys, a text query's too
    image_rows = cache[f"{path}.hook_img2img"].sum(-1) + cache[f"{path}.hook_img2txt"].sum(-1)
    text_rows = cache[f"{path}.hook_txt2img"].sum(-1) + cache[f"{path}.hook_txt2txt"].sum(-1)
    torch.testing.assert_close(image_rows, torch.ones(B, n))
    torch.testing.assert_close(text_rows, torch.ones(B, text))
    assert cache[f"{path}.hook_img2txt"].shape == (B, n, text) and cache[f"{path}.hook_txt2img"].shape == (B, text, n)
    # the memory estimate made before running, from metadata, is what the capture holds
    divisor = tiny.probe.sites[names[0]].divisor
    latent = (GRID[0] * divisor, GRID[1] * divisor)
    held = sum(cache[m].numel() * cache[m].element_size() for m in cache.names)
    assert tiny.probe.bytes_per_call(Need(names, Reduce(heads="mean")), latent, batch=B) == held
    assert cache.maps(f"{path}.hook_img2txt").shape == (B, text, *GRID)   # per-token maps on the grid


def test_gradients_flow_to_the_text_and_query_upsampling_is_refused_where_it_cannot_be_recomputed(tiny):
    site = tiny.first("cross_attn")
    ctx = tiny.cond.context.clone().requires_grad_(True)
    with torch.enable_grad(), tiny.probe.capture(site, grad=True) as cache:
        tiny(ctx)
        cache[site][..., 0].sum().backward()
    assert ctx.grad is not None and float(ctx.grad.abs().sum()) > 0
    if tiny.family.captures_at_kernel and not tiny.family.upsamples_queries:
        with pytest.raises(Exception, match=f"upsample_queries cannot be used.*{tiny.family.name}"):
            with tiny.probe.capture(site, upsample_queries=8):
                pass


def test_upsampled_queries_of_the_image_to_text_block(tiny):
    # the module's image input upsampled bicubically, through its to_q and qk norm, against the call's keys;
    # the softmax over all (image and text) keys, the text columns kept; gradients reach the text
    if not (tiny.family.captures_at_kernel and tiny.family.upsamples_queries):
        pytest.skip("upsampled queries at the kernel: families that can recompute them (PixArt recomputes them from "
                    "its input like the UNet; the others refuse, tested above)")
    from diffprobe.hooks.attention import upsample_tokens

    probe, model = tiny.probe, tiny.model
    site = probe.select("*.hook_img2txt")[-1]
    attn = model.get_submodule(probe.sites[site].module)
    call = _inputs_of_every_attention(tiny)[probe.sites[site].module]
    x, ctx = call["hidden_states"], call["encoder_hidden_states"]
    q = _norm(attn.norm_q, _heads(attn.to_q(upsample_tokens(x, GRID, (6, 5))), attn))
    k = torch.cat([_norm(attn.norm_k, _heads(attn.to_k(x), attn)),
                   _norm(attn.norm_added_k, _heads(attn.add_k_proj(ctx), attn))], 2)
    want = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)[..., _n(tiny):].mean(1)   # (B, 30, T)
    text = tiny.cond.context.clone().requires_grad_(True)
    with torch.enable_grad(), probe.capture(site, upsample_queries=(6, 5), reduce=Reduce(heads="mean"),
                                            grad=True) as cache:
        out = tiny(text)
        cache[site][..., 0].sum().backward()
    torch.testing.assert_close(cache[site], want, rtol=0, atol=1e-5)
    assert cache.grid(site) == (6, 5) and torch.equal(out, tiny())
    assert float(text.grad.abs().sum()) > 0


def test_features_are_the_blocks_image_tokens_and_modulation(tiny):
    probe, model = tiny.probe, tiny.model
    block = tiny.first("block")
    path = probe.sites[block].module
    got = {}
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, o: got.setdefault("out", o))
    try:
        with probe.capture(Need([f"{path}.hook_*"])) as cache:
            tiny()
    finally:
        handle.remove()
    tokens = got["out"][1] if isinstance(got["out"], tuple) else got["out"]
    h, w = GRID
    feature = cache[block]
    assert feature.shape == (B, tokens.shape[-1], h, w)
    torch.testing.assert_close(feature[:, :, 1, 2], tokens[:, 1 * w + 2])   # row-major token (1, 2)
    if f"{path}.hook_modulation" in probe.sites:
        mod = cache[f"{path}.hook_modulation"]
        assert mod.shape == (B, probe.sites[f"{path}.hook_modulation"].channels)
        assert not torch.equal(mod[0], mod[1])   # two timesteps, two modulations
    singles = probe.select(lambda s: s.kind == "block" and s.direction == "single")
    if singles:   # a single-stream block's output holds [text, image]: the site keeps the image's tokens
        seen = {}
        module = model.get_submodule(probe.sites[singles[0]].module)
        handle = module.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
        try:
            with probe.capture(singles[0]) as cache:
                tiny()
        finally:
            handle.remove()
        out = seen["out"][1] if isinstance(seen["out"], tuple) else seen["out"][:, -h * w:]
        torch.testing.assert_close(cache[singles[0]][:, :, 2, 4], out[:, 2 * w + 4])


def test_modulation_is_what_the_block_applies_to_its_normalised_input(tiny):
    """Every block with an AdaLN site: (1 + scale) * LayerNorm(x) + shift, its first two chunks on the block's input
    x, equals the hidden states its first attention receives (the image's tokens)."""
    from diffprobe.families.base import call_arguments

    mods = tiny.probe.select(lambda s: s.kind == "modulation")
    assert mods, f"{tiny.structure}: no AdaLN modulation site"
    seen, handles = {}, []
    for name in mods:
        path = tiny.probe.sites[name].module.removesuffix(".norm1.linear").removesuffix(".norm.linear")
        attn = min((s for s in tiny.probe.sites.values() if s.is_attention and s.module.startswith(path + ".")),
                   key=lambda s: s.order).module

        def keep(key):
            def hook(module, args, kwargs):
                seen.setdefault(key, call_arguments(module, args, kwargs)["hidden_states"])
            return hook
        handles += [tiny.model.get_submodule(path).register_forward_pre_hook(keep(path + ":in"), with_kwargs=True),
                    tiny.model.get_submodule(attn).register_forward_pre_hook(keep(path + ":attn"), with_kwargs=True)]
    try:
        with tiny.probe.capture(mods) as cache:
            tiny()
    finally:
        for h in handles:
            h.remove()
    for name in mods:
        path = tiny.probe.sites[name].module.removesuffix(".norm1.linear").removesuffix(".norm.linear")
        x, got = seen[path + ":in"], seen[path + ":attn"]
        c = x.shape[-1]
        shift, scale = cache[name][:, :c, None].transpose(1, 2), cache[name][:, c:2 * c, None].transpose(1, 2)
        want = torch.nn.functional.layer_norm(x, (c,), eps=1e-6) * (1 + scale) + shift
        torch.testing.assert_close(got[:, -x.shape[1]:], want, rtol=1e-4, atol=1e-4)   # modulations are large


def test_registry_picks_the_family_of_the_model(tiny):
    from diffprobe.loading import family_of_structure

    assert tiny.probe.family is family_of_structure(tiny.structure)


def test_site_order_is_the_order_modules_fire(tiny):
    probe, model = tiny.probe, tiny.model
    fired, handles = [], []
    for path in dict.fromkeys(s.module for s in probe.sites.values()):
        handles.append(model.get_submodule(path).register_forward_hook(lambda m, a, o, p=path: fired.append(p)))
    try:
        tiny()
    finally:
        for h in handles:
            h.remove()
    by_order = sorted(probe.sites.values(), key=lambda s: s.order)
    assert fired == list(dict.fromkeys(s.module for s in by_order))   # a joint module's sites are consecutive


def test_layout_early_exit_and_on_step_work_on_joint_attention(tiny):
    _joint(tiny)
    from diffprobe.hooks import BatchLayout

    probe = tiny.probe
    first = tiny.first("cross_attn")
    with probe.capture(first, reduce=Reduce(heads="mean")) as full:
        tiny()
    seen, after, timesteps = [], [], []
    with probe.capture(first, reduce=Reduce(heads="mean"), layout=BatchLayout(cfg=True, keep="cond"), early_exit=True,
                       on_step=lambda step, t, tensors: seen.append((step, sorted(tensors)))) as cache:
        tiny()
        after.append("not reached")          # the forward stopped at the first block
    assert after == [] and seen == []          # early exit: the model's post-hook (on_step) never ran
    torch.testing.assert_close(cache[first], full[first][1:])   # rows [uncond; cond]: the cond half kept
    handle = tiny.model.register_forward_pre_hook(
        lambda m, a, kw: timesteps.append(float(kw["timestep"].reshape(-1)[0])), with_kwargs=True)
    try:
        with probe.capture(first, on_step=lambda step, t, tensors: seen.append((step, float(t), list(tensors)))):
            tiny()
    finally:
        handle.remove()
    assert seen == [(0, timesteps[0], [first])]   # the timestep as the model took it


def test_blocks_alone_come_from_the_fused_kernels_normalisers_in_reuse_mode(tiny, monkeypatch):
    # only blocks of the joint maps wanted: the fused kernel gives the output and each row's log normaliser, and
    # just the blocks' scores are computed; they equal the blocks sliced from the recomputed whole map
    _joint(tiny)
    import diffprobe.hooks.capture as capture_module

    probe = tiny.probe
    calls = []
    real = capture_module.attention_with_lse
    monkeypatch.setattr(capture_module, "attention_with_lse", lambda *a: calls.append(1) or real(*a))
    needs = lambda: [Need("*.hook_img2txt", Reduce(heads="mean")),  # noqa: E731
                     Need(["*.hook_txt2img", "*.hook_img2txt"], Reduce(heads="none"), rows=(1, 2))]
    bare = tiny()
    with probe.capture(needs()) as exact:
        tiny()
    with probe.capture(needs(), attention="reuse") as reused:
        out = tiny()
    assert len(calls) == len({probe.sites[n].module for n in probe.select("*.hook_img2txt")})
    torch.testing.assert_close(out, bare, rtol=0, atol=1e-5 * scale(bare))
    for a, b in zip(exact, reused):
        assert a.names == b.names
        for name in a.names:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
