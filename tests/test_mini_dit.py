"""The shipped diffprobe-mini-dit: its transformer loads with mini's other parts through `model=mini_dit`, the
package data of both models stays within 30 MiB, and its attention beats its untrained control."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from diffprobe.loading import load_backbone
from diffprobe.data.world import render_scene, scene_seed
from diffprobe.drives import generate
from diffprobe.mini import PACKAGED
from diffprobe.mini.quality import score_attention, untrained_control

DIT = PACKAGED.parent / "mini_dit"
pytestmark = pytest.mark.skipif(not (DIT / "model_index.json").is_file(), reason="mini-dit not built yet")


@pytest.fixture(scope="module")
def bb():
    cfg = OmegaConf.load(PACKAGED.parent.parent.parent / "conf" / "model" / "mini_dit.yaml")
    return load_backbone(cfg)   # relative paths resolve against the installed package from any directory


def test_package_data_of_both_models_is_small_and_mini_dit_ships_only_its_transformer():
    files = [p for d in (PACKAGED, DIT) for p in d.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    assert {p.parent.name for p in DIT.rglob("*.safetensors")} == {"transformer"}
    record = json.loads((DIT / "training_config.json").read_text())
    assert record["unet_steps_done"] > 0 and record["train"]["denoiser"] == "pixart"


def test_loads_as_a_pixart_transformer_on_minis_parts(bb):
    assert bb.family.name == "pixart" and type(bb.unet).__name__ == "PixArtTransformer2DModel"
    assert bb.unet.dtype == torch.float32 and (bb.sample_size, bb.vae_factor, bb.max_tokens) == (64, 2, 24)
    images, _ = generate(bb, ["a red circle on grass under sky"], guidance=3.0, num_steps=4,
                         generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all() and images.std() > 0


def test_attention_groups_objects_and_finds_words_better_than_its_untrained_control(bb):
    scenes = [render_scene(scene_seed("test", i), 64) for i in range(24)]
    trained = score_attention(bb, scenes, 300, noised=False)["16x16"]
    control = score_attention(untrained_control(bb), scenes, 300, noised=False)["16x16"]
    assert trained["self/unif"] > 1.5 * control["self/unif"]
    assert trained["cat peak"] > control["cat peak"] + 0.2
