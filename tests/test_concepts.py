"""Concept maps (ConceptAttention, diffprobe.concepts): the planted tests of the spec (heatmaps_peers.md §3 f), the
model's outputs bit-identical with and without concepts on every family, and the concept stream checked against an
independent run of the model's own blocks with the concepts as its prompt."""

import pytest
import torch

from diffprobe.concepts import ConceptAttention, MapMean, concept_attention, concept_scores, encode_concepts
from diffprobe.errors import DiffprobeError
from diffprobe.families.base import Conditioning
from diffprobe.loading import tiny_backbone
from diffprobe.runner import unet_call

CONCEPTS = ["cat", "red", "dog"]


def test_planted_regions_get_their_concept_and_every_patch_sums_to_one():
    """One head, d = 2, identity projections: image q = k = v = 8 e1 on a region R of a 4 x 4 grid, 8 e2 elsewhere;
    concepts 8 e1 and 8 e2. The image's own attention output is 8 e1 on R (8 e2 elsewhere, up to e^-64), the
    concepts' likewise, so map_0 > 0.5 exactly on R, and the maps sum to 1 over the concepts at every patch (a
    softmax over the patches instead would not)."""
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[1:3, 0:2] = True
    e1, e2 = torch.tensor([8.0, 0.0]), torch.tensor([0.0, 8.0])
    x = torch.where(region.reshape(-1, 1), e1, e2)[None, None]            # (1, 1, 16, 2)
    c = torch.stack([e1, e2])[None, None]                                  # (1, 1, 2, 2)
    image_out = torch.softmax(x @ x.transpose(-1, -2), -1) @ x              # the image's own attention
    attended = concept_attention(c, c, c, x, x, 1.0)
    maps = concept_scores(attended, image_out)[0]                          # (2, 16)
    assert torch.equal((maps[0] > 0.5).reshape(4, 4), region)
    assert torch.allclose(maps.sum(0), torch.ones(16))
    assert torch.allclose(attended[0, 0], torch.stack([e1, e2]), atol=1e-5)


def test_softmax_per_layer_then_the_mean():
    """Two layers' scores at one patch, [10, 0] and [0, 1]: ConceptAttention's pipeline takes the softmax per layer
    then the mean (0.634 for the first concept), not the softmax of the mean scores (0.989)."""
    mean = MapMean()
    for scores in ([10.0, 0.0], [0.0, 1.0]):
        mean.add(torch.tensor(scores)[None, :, None].softmax(1), (1, 1))
    import math
    want = (1 / (1 + math.exp(-10)) + 1 / (1 + math.e)) / 2                 # 0.6345; softmax of the mean: 0.989
    assert mean.mean()[0, 0, 0, 0].item() == pytest.approx(want, abs=1e-6)


def _call(bb, prompt="a red cat", seed=0):
    g = torch.Generator().manual_seed(seed)
    side = 8   # latent side of every tiny model
    latents = torch.randn(2, bb.vae.config.latent_channels, side, side, generator=g)
    cond = bb.family.encode_prompt(bb, [prompt, "a dog"], (side * bb.grid_factor,) * 2)
    return lambda: unet_call(bb, latents, torch.tensor(500), cond)


@pytest.mark.parametrize("structure", ["sd15", "sdxl", "pixart", "sd3", "sd35", "flux"])
def test_outputs_are_bit_identical_with_concepts(structure):
    """The denoiser's output with three concepts mapped equals the bare call's bit for bit; every patch's map is a
    distribution over the concepts; the hooks are gone on exit."""
    bb = tiny_backbone(structure)
    call = _call(bb)
    bare = call()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bb.unet.modules())
    with ConceptAttention(bb, CONCEPTS) as ca:
        out = call()
        out2 = call()
    assert torch.equal(out, bare) and torch.equal(out2, bare) and ca.calls == 2
    maps = ca.maps()
    assert maps.shape[:2] == (2, 3) and torch.allclose(maps.sum(1), torch.ones_like(maps[:, 0]), atol=1e-5)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bb.unet.modules()) == hooks


def _inputs(module, shape_rows: int, into: list):
    """A pre-hook keeping the first argument of the calls of `module` whose rows number `shape_rows`."""
    def hook(mod, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        if x.shape[1] == shape_rows:
            into.append(x.detach().clone())
    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("structure", ["sd3", "flux"])
def test_the_concept_stream_is_the_blocks_own_text_stream_with_the_concepts_as_prompt(structure):
    """Independent check of the joint path: a run of the model with the concepts' states as its whole prompt and a
    zero pooled vector gives, in block 0, the same text-stream attention output (the input of to_add_out) and the
    same text stream into block 1 as the concept stream beside the real prompt (given a zero pooled vector too,
    the image stream of both runs is the same in block 0); block 0's map is the softmax over concepts of that
    output dotted with the real run's image attention output."""
    bb = tiny_backbone(structure)
    side = 8   # latent side of every tiny model
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, bb.vae.config.latent_channels, side, side, generator=g)
    t = torch.tensor(600)
    cond = bb.family.encode_prompt(bb, ["a red cat"], (side * bb.grid_factor,) * 2)
    zero = {**cond.added, "pooled_projections": torch.zeros_like(cond.added["pooled_projections"])}
    cond = Conditioning(cond.context, zero)     # one timestep embedding for both streams in both runs
    blocks = bb.family.concept_blocks(bb.unet)
    attn0, next_norm = blocks[0][1].attn, blocks[1][1].norm1_context
    C = len(CONCEPTS)

    concept_out, concept_in1, image_out = [], [], []
    handles = [_inputs(attn0.to_add_out, C, concept_out), _inputs(next_norm, C, concept_in1),
               attn0.to_out[0].register_forward_pre_hook(lambda m, a: image_out.append(a[0].detach().clone()))]
    with ConceptAttention(bb, CONCEPTS, blocks=[0]) as ca, ConceptAttention(bb, CONCEPTS, blocks=[1]):
        unet_call(bb, latents, t, cond)        # two at once: the second runs its stream into block 1
    for h in handles:
        h.remove()

    states = encode_concepts(bb, CONCEPTS)[None]
    alone = Conditioning(states, zero)
    ref_out, ref_in1 = [], []
    handles = [_inputs(attn0.to_add_out, C, ref_out), _inputs(next_norm, C, ref_in1)]
    unet_call(bb, latents, t, alone)
    for h in handles:
        h.remove()

    assert len(concept_out) == 2 and all(torch.allclose(o, ref_out[0], atol=1e-5) for o in concept_out)
    assert len(concept_in1) == 1 and torch.allclose(concept_in1[0], ref_in1[0], atol=1e-5)
    assert attn0.heads > 1   # heads concatenated before the dot product
    want = torch.einsum("bcd,bnd->bcn", ref_out[0], image_out[0]).softmax(1)
    assert torch.allclose(ca.maps().flatten(2), want, atol=1e-5)


@pytest.mark.parametrize("structure", ["sd15", "pixart"])
def test_cross_path_keys_are_cross_attention_with_the_concepts_as_the_prompt(structure):
    """The read-only analogue at the first cross-attention (whose image queries no text has touched yet): the
    concept map equals the head-averaged cross-attention a capture records when the concepts' states are the whole
    prompt; the output space is the image's attention output dotted with each concept's value."""
    bb = tiny_backbone(structure)
    site = next(n for n, s in bb.probe.sites.items() if s.kind == "cross_attn")
    side = 8   # latent side of every tiny model
    latents = torch.randn(1, bb.vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(300)
    cond = bb.family.encode_prompt(bb, ["a red cat"], (side * bb.grid_factor,) * 2)
    attn = bb.unet.get_submodule(bb.probe.sites[site].module)
    seen = []
    h = attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with ConceptAttention(bb, CONCEPTS, sites=site, space="keys") as keys, ConceptAttention(bb, CONCEPTS,
                                                                                            sites=site) as out:
        unet_call(bb, latents, t, cond)
    h.remove()

    from diffprobe.hooks import Need, Reduce
    states = encode_concepts(bb, CONCEPTS)[None]
    with bb.probe.capture(Need((site,), Reduce(heads="mean"))) as cache:
        added = {k: torch.ones(1, 3, dtype=v.dtype) if "mask" in k else v for k, v in (cond.added or {}).items()}
        unet_call(bb, latents, t, Conditioning(states, added or None))
    want = cache[site][0].transpose(0, 1).reshape(1, 3, -1)              # (Q, C) -> (1, C, Q)
    assert torch.allclose(keys.maps().flatten(2), want, atol=1e-5)
    context = bb.family.attention_context(bb.unet, states)
    values = attn.to_v(context)[0]
    direct = torch.einsum("nd,cd->cn", seen[0][0], values).softmax(0)
    assert torch.allclose(out.maps()[0].flatten(1), direct, atol=1e-5)


def test_refusals():
    bb = tiny_backbone("sd15")
    with pytest.raises(DiffprobeError, match="concepts must be"):
        ConceptAttention(bb, [])
    with pytest.raises(DiffprobeError, match="space"):
        ConceptAttention(bb, ["cat"], space="values")
    flux = tiny_backbone("flux")
    with pytest.raises(DiffprobeError, match="joint blocks"):
        ConceptAttention(flux, ["cat"], blocks=[7])
    with pytest.raises(DiffprobeError, match="no denoiser call"):
        ConceptAttention(bb, ["cat"]).maps()
