"""Site enumeration: golden lists per structure, hand-checked structure facts, real execution order, selection."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from diffprobe.families import FAMILIES
from diffprobe.hooks import ProbeRegistry
from diffprobe.loading import build_denoiser

GOLDEN = Path(__file__).parent / "golden"


def _mini_unet():
    from diffprobe.mini.models import MiniArch, build_unet as build_mini_unet

    with torch.device("meta"):
        return build_mini_unet(MiniArch())


# every structure of every registered family (its published config, on the meta device) and its golden site list
# golden/sites_<structure>.json; the catch-all UNet family ("custom") is diffprobe-mini's
STRUCTURES = {structure: (family.name, lambda s=structure: build_denoiser(s, device="meta"))
              for family in FAMILIES for structure in family.configs}
STRUCTURES["mini"] = ("custom", _mini_unet)


def test_every_family_has_a_model_and_a_golden_site_list():
    assert {name for name, _ in STRUCTURES.values()} == {f.name for f in FAMILIES}
    assert all((GOLDEN / f"sites_{s}.json").is_file() for s in STRUCTURES), "a structure lacks its golden list"


@pytest.fixture(scope="module", params=sorted(STRUCTURES))
def real_registry(request):
    family, build = STRUCTURES[request.param]
    return family, request.param, ProbeRegistry(build())


def test_golden_site_list(real_registry):
    family, structure, probe = real_registry
    assert probe.family.name == family  # the table picks this family for this model
    golden = json.loads((GOLDEN / f"sites_{structure}.json").read_text())
    got = [[s.name, s.kind, s.divisor, s.heads, s.channels] for s in probe.sites.values()]
    assert got == golden


def test_sd35_golden_site_list_and_transformer_structure_facts():
    probe = ProbeRegistry(build_denoiser("sd35", device="meta"))
    assert probe.family.name == "sd3"
    golden = json.loads((GOLDEN / "sites_sd35.json").read_text())
    assert [[s.name, s.kind, s.divisor, s.heads, s.channels] for s in probe.sites.values()] == golden
    kinds = Counter(s.kind for s in probe.sites.values())
    # 24 joint blocks, each a joint map + 4 blocks of it; 13 blocks with a second image self-attention
    assert kinds == {"joint_attn": 24, "self_attn": 24 + 13, "cross_attn": 24, "txt2img": 24, "txt2txt": 24,
                     "modulation": 24, "block": 24}
    assert {(s.divisor, s.heads, s.channels) for s in probe.sites.values() if s.is_attention} == {(2, 24, 1536)}
    assert all(s.text_first is False for s in probe.sites.values() if s.part is not None)
    # SD3.5's first blocks modulate with 9 vectors (two attentions), the others with 6
    mods = [s.channels for s in probe.sites.values() if s.kind == "modulation"]
    assert mods == [9 * 1536] * 13 + [6 * 1536] * 11   # the image stream's norm1 (not the text stream's)

    aura = ProbeRegistry(build_denoiser("auraflow", device="meta"))   # AuraFlow v0.3: 4 MMDiT + 32 single blocks
    joint = [s for s in aura.sites.values() if s.kind == "joint_attn"]
    assert [s.direction for s in joint] == ["dit"] * 4 + ["single"] * 32 and all(s.text_first for s in joint)
    assert {(s.divisor, s.heads, s.channels) for s in joint} == {(2, 12, 3072)}

    flux = ProbeRegistry(build_denoiser("flux", device="meta"))
    double = [s for s in flux.sites.values() if s.kind == "joint_attn" and s.direction == "dit"]
    single = [s for s in flux.sites.values() if s.kind == "joint_attn" and s.direction == "single"]
    assert len(double) == 19 and len(single) == 38 and {s.heads for s in double + single} == {24}
    assert all(s.text_first for s in double + single) and {s.divisor for s in double + single} == {1}


def test_sd15_structure_facts():
    probe = ProbeRegistry(build_denoiser("sd15", device="meta"))
    kinds = Counter(s.kind for s in probe.sites.values())
    assert kinds == {"self_attn": 16, "cross_attn": 16, "resnet": 22, "block": 9}
    self_by_div = Counter(s.divisor for s in probe.sites.values() if s.kind == "self_attn")
    assert self_by_div == {1: 5, 2: 5, 4: 5, 8: 1}  # 64, 32, 16 px (5 each) and the 8x8 mid block at 512 px
    decoder = [s for s in probe.sites.values() if s.kind == "resnet" and s.direction == "up"]
    assert [s.channels for s in decoder] == [1280] * 6 + [640] * 3 + [320] * 3
    assert [s.divisor for s in decoder] == [8] * 3 + [4] * 3 + [2] * 3 + [1] * 3
    assert all(s.heads == 8 for s in probe.sites.values() if s.is_attention)
    assert {s.context_dim for s in probe.sites.values() if s.kind == "cross_attn"} == {768}


def test_sdxl_structure_facts():
    probe = ProbeRegistry(build_denoiser("sdxl", device="meta"))
    attn = [s for s in probe.sites.values() if s.kind == "self_attn"]
    assert len(attn) == 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2  # down 1, down 2, mid, up 0, up 1
    assert not any(s.block == 0 and s.direction == "down" for s in attn)  # no attention at the top level
    mid = [s for s in attn if s.direction == "mid"]
    assert len(mid) == 10 and {s.divisor for s in mid} == {4}
    assert {s.heads for s in attn} == {10, 20}


def test_order_matches_real_execution():
    """Site.order equals the order in which hooks actually fire in a forward pass (tiny SDXL and SD 1.5)."""
    from diffprobe.loading import tiny_backbone
    from diffprobe.drives import encode_prompt, unet_call

    for structure in ("sd15", "sdxl"):
        bb = tiny_backbone(structure)
        probe = ProbeRegistry(bb.unet)
        fired = []
        handles = []
        for site in probe.sites.values():
            module = bb.unet.get_submodule(site.module)
            handles.append(module.register_forward_hook(lambda m, a, o, n=site.name: fired.append(n)))
        try:
            unet_call(bb, torch.randn(1, 4, 8, 8), 10, encode_prompt(bb, [""]))
        finally:
            for h in handles:
                h.remove()
        # a resnet's hook fires on the block module, after its conv2: order among sites is the same
        assert fired == sorted(probe.sites, key=lambda n: probe.sites[n].order)


def test_select_by_glob_list_and_predicate():
    probe = ProbeRegistry(build_denoiser("sd15", device="meta"))
    up_cross = probe.select("up_blocks.*.attn2.hook_probs")
    assert len(up_cross) == 9 and all(probe.sites[n].direction == "up" for n in up_cross)
    assert probe.select(lambda s: s.kind == "cross_attn" and s.divisor == 4) == [
        n for n in probe.sites if probe.sites[n].kind == "cross_attn" and probe.sites[n].divisor == 4
    ]
    both = probe.select(["mid_block.hook_out", "up_blocks.0.resnets.2.hook_residual"])
    assert both == ["mid_block.hook_out", "up_blocks.0.resnets.2.hook_residual"]  # execution order, not list order
    with pytest.raises(KeyError, match="nope"):
        probe.select("nope*")


def test_resolution_rounds_up_like_stride_two_convs():
    probe = ProbeRegistry(build_denoiser("sd15", device="meta"))
    mid = probe.sites["mid_block.hook_out"]
    assert mid.divisor == 8 and mid.resolution((64, 64)) == (8, 8) and mid.resolution((60, 36)) == (8, 5)
