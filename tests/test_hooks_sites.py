"""Site enumeration: golden lists per structure, hand-checked structure facts, real execution order, selection."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from diffprobe.architectures import build_transformer, build_unet
from diffprobe.hooks import ProbeRegistry

GOLDEN = Path(__file__).parent / "golden"


def _mini_unet():
    from diffprobe.mini.models import MiniArch, build_unet as build_mini_unet

    with torch.device("meta"):
        return build_mini_unet(MiniArch())


# every registered backend (model family): a model of it built from configs and its golden site list
FAMILIES = {"sd1": (lambda: build_unet("sd15", device="meta"), "sites_sd15.json"),
            "sd2": (lambda: build_unet("sd21", device="meta"), "sites_sd21.json"),
            "sdxl": (lambda: build_unet("sdxl", device="meta"), "sites_sdxl.json"),
            "custom": (_mini_unet, "sites_mini.json"),
            "pixart": (lambda: build_transformer("pixart", device="meta"), "sites_pixart.json"),
            "sd3": (lambda: build_transformer("sd3", device="meta"), "sites_sd3.json"),
            "flux": (lambda: build_transformer("flux", device="meta"), "sites_flux.json")}


def test_every_backend_has_a_model_and_a_golden_site_list():
    from diffprobe.backends import BACKENDS

    assert {b.name for b in BACKENDS} == set(FAMILIES)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def real_registry(request):
    build, golden = FAMILIES[request.param]
    return request.param, golden, ProbeRegistry(build())


def test_golden_site_list(real_registry):
    family, golden_file, probe = real_registry
    assert probe.backend.name == family  # the table picks this family for this model
    golden = json.loads((GOLDEN / golden_file).read_text())
    got = [[s.name, s.kind, s.divisor, s.heads, s.channels] for s in probe.sites.values()]
    assert got == golden


def test_sd35_golden_site_list_and_transformer_structure_facts():
    probe = ProbeRegistry(build_transformer("sd35", device="meta"))
    assert probe.backend.name == "sd3"
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

    flux = ProbeRegistry(build_transformer("flux", device="meta"))
    double = [s for s in flux.sites.values() if s.kind == "joint_attn" and s.direction == "dit"]
    single = [s for s in flux.sites.values() if s.kind == "joint_attn" and s.direction == "single"]
    assert len(double) == 19 and len(single) == 38 and {s.heads for s in double + single} == {24}
    assert all(s.text_first for s in double + single) and {s.divisor for s in double + single} == {1}


def test_sd15_structure_facts():
    probe = ProbeRegistry(build_unet("sd15", device="meta"))
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
    probe = ProbeRegistry(build_unet("sdxl", device="meta"))
    attn = [s for s in probe.sites.values() if s.kind == "self_attn"]
    assert len(attn) == 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2  # down 1, down 2, mid, up 0, up 1
    assert not any(s.block == 0 and s.direction == "down" for s in attn)  # no attention at the top level
    mid = [s for s in attn if s.direction == "mid"]
    assert len(mid) == 10 and {s.divisor for s in mid} == {4}
    assert {s.heads for s in attn} == {10, 20}


def test_order_matches_real_execution():
    """Site.order equals the order in which hooks actually fire in a forward pass (tiny SDXL and SD 1.5)."""
    from diffprobe.backbones import tiny_backbone
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
    probe = ProbeRegistry(build_unet("sd15", device="meta"))
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
    probe = ProbeRegistry(build_unet("sd15", device="meta"))
    mid = probe.sites["mid_block.hook_out"]
    assert mid.divisor == 8 and mid.resolution((64, 64)) == (8, 8) and mid.resolution((60, 36)) == (8, 5)
