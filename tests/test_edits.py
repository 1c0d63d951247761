"""probe.intervene (diffprobe.hooks.edits): identity edits leave every family's output bit-identical; planted edits
give the layer output computed by hand from independently captured probabilities and values; patching, steering,
head ablation, gradients, composition with captures, and restoring the model on exit and on errors."""

import pytest
import torch
from einops import rearrange

from diffprobe.drives import unet_call
from diffprobe.errors import DiffprobeError
from diffprobe.hooks import Need, Reduce
from diffprobe.hooks.edits import Add, Clamp, Heads, Scale, Set
from diffprobe.loading import tiny_backbone

FAMILIES = ["sd15", "sdxl", "pixart", "sd3", "sd35", "flux", "auraflow"]


def _inputs(bb, prompt="a red cat", batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, bb.vae.config.latent_channels, 8, 8, generator=g)
    cond = bb.family.encode_prompt(bb, [prompt] * batch, (8 * bb.vae_factor,) * 2)
    return latents, cond


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("structure", FAMILIES)
def test_identity_edits_everywhere_are_bit_identical(structure):
    """Scale by 1 at every attention site (joint blocks included), an empty head ablation, and adding zeros at every
    editable feature site: the output equals the bare call's bit for bit, and the hooks are gone after."""
    bb = tiny_backbone(structure)
    latents, cond = _inputs(bb)
    bare = unet_call(bb, latents, 500, cond)
    sites = bb.probe.sites
    edits = {}
    for name, s in sites.items():
        if s.is_attention:
            edits[name] = [Scale(columns=(0,), factor=1.0), Heads(heads=())]
        elif not (structure == "pixart" and s.kind == "modulation"):
            edits[name] = Add(torch.zeros(()))
    before = _hooks(bb.unet)
    with bb.probe.intervene(edits):
        out = unet_call(bb, latents, 500, cond)
    assert torch.equal(out, bare)
    assert _hooks(bb.unet) == before


def _site_io(bb, site_name):
    """Hooks recording the module's pre-projection attention output (B, N, heads * d) per call."""
    attn = bb.unet.get_submodule(bb.probe.sites[site_name].module)
    seen = []
    handle = attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    return attn, seen, handle


@pytest.mark.parametrize("structure", ["sd15", "sdxl", "pixart"])
def test_a_planted_cross_attention_ablation_gives_the_hand_computed_output(structure):
    """The first cross-attention, token 2's column scaled by 0 (not renormalised): the layer's output before to_out
    is the bare one minus P[:, :, :, 2] V[2], with P captured by a plain capture (PixArt's padding mask included) and
    V = to_v of the context the module was given; the first rows only (rows=(0, 1)) are edited."""
    bb = tiny_backbone(structure)
    latents, cond = _inputs(bb)
    site = next(n for n, s in bb.probe.sites.items() if s.kind == "cross_attn")
    attn, seen, handle = _site_io(bb, site)
    context = []
    given = attn.register_forward_pre_hook(lambda m, a, k: context.append(k["encoder_hidden_states"].clone()),
                                           with_kwargs=True)
    with bb.probe.capture(Need((site,), Reduce(heads="none"))) as cache:
        unet_call(bb, latents, 500, cond)
    with bb.probe.intervene({site: Scale(columns=(2,), factor=0.0, rows=(0, 1))}):
        unet_call(bb, latents, 500, cond)
    handle.remove()
    given.remove()
    probs = cache[site]                                                   # (B, heads, Q, T)
    values = rearrange(attn.to_v(context[0]), "b t (h d) -> b h t d", h=attn.heads)
    change = -probs[:, :, :, 2:3] @ values[:, :, 2:3]
    want = seen[0] + rearrange(change, "b h q d -> b q (h d)")
    torch.testing.assert_close(seen[1][:1], want[:1], atol=1e-6, rtol=1e-5)
    assert torch.equal(seen[1][1:], seen[0][1:])                          # row 1 untouched


@pytest.mark.parametrize("structure", ["sd3", "sd35", "flux", "auraflow"])
def test_a_planted_joint_image_to_text_edit_changes_only_that_block(structure):
    """A joint attention's img2txt block, text column 1 scaled by 3: the image rows' output before the projection
    gain 2 P_img2txt[..., 1] V_text[1] (P from a plain capture of the block, V from add_v_proj of the text the
    module was given); the text stream's own attention output is untouched."""
    bb = tiny_backbone(structure)
    latents, cond = _inputs(bb, batch=1)
    site = next(n for n, s in bb.probe.sites.items() if s.part == "img2txt")
    attn = bb.unet.get_submodule(bb.probe.sites[site].module)
    image_out, text_out, text_in = [], [], []
    handles = [attn.to_out[0].register_forward_pre_hook(lambda m, a: image_out.append(a[0].detach().clone())),
               attn.to_add_out.register_forward_pre_hook(lambda m, a: text_out.append(a[0].detach().clone())),
               attn.register_forward_pre_hook(lambda m, a, k: text_in.append(k["encoder_hidden_states"].clone()),
                                              with_kwargs=True)]
    with bb.probe.capture(Need((site,), Reduce(heads="none"))) as cache:
        unet_call(bb, latents, 500, cond)
    with bb.probe.intervene({site: Scale(columns=(1,), factor=3.0)}):
        unet_call(bb, latents, 500, cond)
    for h in handles:
        h.remove()
    probs = cache[site]                                                   # (1, heads, N, T)
    values = rearrange(attn.add_v_proj(text_in[0]), "b t (h d) -> b h t d", h=attn.heads)
    want = image_out[0] + rearrange(2 * probs[..., 1:2] @ values[:, :, 1:2], "b h q d -> b q (h d)")
    torch.testing.assert_close(image_out[1], want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(image_out[1], image_out[0])
    torch.testing.assert_close(text_out[1], text_out[0], atol=1e-6, rtol=0)


def test_head_ablation_and_patched_probabilities():
    """Heads([0]) zeroes head 0's output and leaves head 1's; Heads([0], mode="mean") puts the mean over queries;
    Set(probabilities of another prompt's run) makes the layer's output P_other V_this."""
    bb = tiny_backbone("sd15")
    latents, cond = _inputs(bb)
    _, other = _inputs(bb, prompt="a blue dog")
    site = next(n for n, s in bb.probe.sites.items() if s.kind == "cross_attn")
    attn, seen, handle = _site_io(bb, site)
    unet_call(bb, latents, 500, cond)
    with bb.probe.intervene({site: Heads(heads=(0,))}):
        unet_call(bb, latents, 500, cond)
    with bb.probe.intervene({site: Heads(heads=(0,), mode="mean")}):
        unet_call(bb, latents, 500, cond)
    with bb.probe.capture(Need((site,), Reduce(heads="none"))) as theirs:
        unet_call(bb, latents, 500, other)
    with bb.probe.intervene({site: Set(value=theirs[site])}):
        unet_call(bb, latents, 500, cond)
    handle.remove()
    bare, zero, mean, _, patched = (rearrange(s, "b q (h d) -> b h q d", h=attn.heads) for s in seen)
    assert torch.equal(zero[:, 0], torch.zeros_like(zero[:, 0])) and torch.equal(zero[:, 1], bare[:, 1])
    torch.testing.assert_close(mean[:, 0], bare[:, 0].mean(1, keepdim=True).expand_as(mean[:, 0]))
    values = rearrange(attn.to_v(cond.context), "b t (h d) -> b h t d", h=attn.heads)
    torch.testing.assert_close(patched, theirs[site] @ values, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("structure", ["sd15", "flux"])
def test_steering_a_feature_is_what_the_next_module_and_a_capture_see(structure):
    """Add(v) at a block's output: a capture of that site (inside or around the edit) records the bare feature plus
    v, and only in the steps asked for; Clamp bounds it."""
    bb = tiny_backbone(structure)
    latents, cond = _inputs(bb)
    site = next(n for n, s in bb.probe.sites.items() if s.kind == "block")
    need = Need((site,), Reduce(steps="all"))
    with bb.probe.capture(need) as bare:
        unet_call(bb, latents, 500, cond)
        unet_call(bb, latents, 500, cond)
    vector = torch.randn(bb.probe.sites[site].channels)
    with bb.probe.capture(need) as steered, bb.probe.intervene({site: Add(vector, scale=2.0, steps=(1,))}):
        unet_call(bb, latents, 500, cond)
        unet_call(bb, latents, 500, cond)
    assert torch.equal(steered[site][0], bare[site][0])                    # step 0 untouched
    torch.testing.assert_close(steered[site][1], bare[site][1] + 2 * vector.reshape(1, -1, 1, 1))
    with bb.probe.intervene({site: Clamp(min=-0.1, max=0.1)}), bb.probe.capture(site) as clamped:
        unet_call(bb, latents, 500, cond)
    assert clamped[site].abs().max() <= 0.1 + 1e-7


def test_gradients_flow_through_edits():
    bb = tiny_backbone("sd15")
    latents, cond = _inputs(bb)
    cross = next(n for n, s in bb.probe.sites.items() if s.kind == "cross_attn")
    block = next(n for n, s in bb.probe.sites.items() if s.kind == "block")
    factor = torch.tensor(2.0, requires_grad=True)
    vector = torch.zeros(bb.probe.sites[block].channels, requires_grad=True)
    context = cond.context.clone().requires_grad_(True)
    from diffprobe.families import Conditioning
    with bb.probe.intervene({cross: Scale(columns=(1, 2), factor=factor), block: Add(vector)}):
        unet_call(bb, latents, 500, Conditioning(context)).square().sum().backward()
    assert factor.grad is not None and factor.grad.abs() > 0
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_restored_on_errors_and_refusals():
    bb = tiny_backbone("sd15")
    latents, cond = _inputs(bb)
    before = _hooks(bb.unet)
    cross = next(n for n, s in bb.probe.sites.items() if s.kind == "cross_attn")
    with pytest.raises(RuntimeError, match="boom"):
        with bb.probe.intervene({cross: Scale(columns=(1,), factor=0.0)}):
            raise RuntimeError("boom")
    assert _hooks(bb.unet) == before
    bare = unet_call(bb, latents, 500, cond)
    assert torch.equal(unet_call(bb, latents, 500, cond), bare)
    block = next(n for n, s in bb.probe.sites.items() if s.kind == "block")
    with pytest.raises(DiffprobeError, match="is a features site"):
        bb.probe.intervene({block: Scale(columns=(1,))}).__enter__()
    with pytest.raises(DiffprobeError, match="is a attention site|is an attention site|attention site"):
        bb.probe.intervene({cross: Add(torch.zeros(4))}).__enter__()
    with bb.probe.intervene({cross: Scale(columns=(1,), factor=0.0)}):
        with pytest.raises(DiffprobeError, match="reuse"):
            with bb.probe.capture(cross, attention="reuse"):
                pass
    assert _hooks(bb.unet) == before


class _WordPieces:
    """A toy tokenizer (the spec's): one token per word, "hippo" two, start token 0, end token 1."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        ids = [t for w in text.split() for t in ([7, 8] if w == "hippo" else [hash(w) % 1000 + 10])]
        return type("Encoded", (), {"input_ids": [0, *ids, 1] if add_special_tokens else ids})()


def test_prompt_to_prompt_replacement_mapper_as_the_reference():
    """"a cat sits" -> "a hippo sits": R[0,0] = R[1,1] = 1, R[2,2] = R[2,3] = 0.5, R[j,j] = 1 for j >= 4 and row 3
    empty (the reference's shift after a swapped word whose token count changed); aligned=True maps source 3 to
    target 4 instead. Equal token counts map token by token."""
    from diffprobe.hooks.edits import replacement_mapper

    r = replacement_mapper(_WordPieces(), "a cat sits", "a hippo sits", length=8)
    want = torch.zeros(8, 8)
    want[0, 0] = want[1, 1] = 1
    want[2, 2] = want[2, 3] = 0.5
    for j in range(4, 8):
        want[j, j] = 1
    assert torch.equal(r, want)
    aligned = replacement_mapper(_WordPieces(), "a cat sits", "a hippo sits", length=8, aligned=True)
    assert aligned[3, 4] == 1 and aligned[3].sum() == 1 and aligned[2, 2] == 0.5
    same = replacement_mapper(_WordPieces(), "a cat sits", "a dog sits", length=6)
    assert torch.equal(same, torch.eye(6))
    with pytest.raises(DiffprobeError, match="as many words"):
        replacement_mapper(_WordPieces(), "a cat", "a big cat")


def test_a_replace_edit_gives_the_source_maps_through_the_mapper():
    """Replace(source probabilities, mapper): the layer's output is (source @ mapper) V of this run."""
    from diffprobe.hooks.edits import Replace

    bb = tiny_backbone("sd15")
    latents, cond = _inputs(bb)
    _, other = _inputs(bb, prompt="a blue dog")
    site = next(n for n, s in bb.probe.sites.items() if s.kind == "cross_attn")
    attn, seen, handle = _site_io(bb, site)
    with bb.probe.capture(Need((site,), Reduce(heads="none", steps="all"))) as source:
        unet_call(bb, latents, 500, other)
    mapper = torch.eye(77).roll(1, dims=1)
    with bb.probe.intervene({site: Replace(source=source[site], mapper=mapper)}):
        unet_call(bb, latents, 500, cond)
    handle.remove()
    values = rearrange(attn.to_v(cond.context), "b t (h d) -> b h t d", h=attn.heads)
    want = rearrange((source[site][0] @ mapper) @ values, "b h q d -> b q (h d)")
    torch.testing.assert_close(seen[-1], want, atol=1e-6, rtol=1e-5)
