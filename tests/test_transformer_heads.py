"""The heads on a diffusion transformer (tiny PixArt) through the same code paths as on UNets: one pass of
diffseg, localize and probe; a keypoints fit step; hyperfeature layers and the raw-layer baseline chosen for a
transformer; a transformer directory loaded with its parts from another directory (mini-dit's layout)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import config_helpers

from diffprobe.loading import load_backbone, save_backbone, tiny_backbone
from diffprobe.errors import DiffprobeError
from diffprobe.heads.hyperfeatures.extract import layer_names
from diffprobe.heads.hyperfeatures.model import RAW_LAYER, resolve_raw_layer
from diffprobe.heads.keypoints.maps import default_sites
from diffprobe.tasks import analyze, keypoints

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
# the tiny model configs of every registered transformer family (conf/model/tiny_<structure>.yaml)
TRANSFORMER_MODELS = [f"tiny_{s}" for f in __import__("diffprobe.families").families.FAMILIES
                      if f.denoiser_folder == "transformer" for s in f.tiny_configs if (CONF / f"tiny_{s}.yaml").is_file()]


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.mark.parametrize("model", TRANSFORMER_MODELS)
def test_one_pass_of_three_heads_on_a_transformer(tmp_path, model):
    photo = _images(tmp_path / "imgs", 1) / "img0.png"
    cfg = config_helpers.make_cfg("analyze", model=model, **{
        "analyze.tasks": ["diffseg", "localize", "probe"], "image": str(photo), "localize.words": ["cat"],
        "localize.prompt": "a cat"})
    analyze.run(cfg, tmp_path / "out")
    seg = json.loads((tmp_path / "out" / "diffseg" / "img0" / "segments.json").read_text())
    assert seg["num_segments"] >= 1
    loc = json.loads((tmp_path / "out" / "localize" / "img0" / "localization.json").read_text())
    assert "cat" in json.dumps(loc)
    index = json.loads((tmp_path / "out" / "probe" / "img0" / "index.json").read_text())
    assert any("transformer_blocks." in name for name in json.dumps(index).split('"'))


@pytest.mark.parametrize("model, site", [("tiny_pixart", "attn2.hook_probs"), ("tiny_sd3", "attn.hook_img2txt")])
def test_keypoints_fit_runs_on_a_transformer_with_its_cross_attention(tmp_path, model, site):
    root = _images(tmp_path / "imgs", 2)
    small = {"num_tokens": 8, "top_k": 2, "candidates": 4, "steps": 2, "fit.batch_size": 1, "upsample_queries": 16,
             "num_indices": 2, "preview": 0, "augmentations": 2}
    cfg = config_helpers.make_cfg("keypoints", model=model, data={"name": "folder", "root": str(root)}, **small)
    summary = keypoints.run(cfg, tmp_path / "fit")
    saved = json.loads((tmp_path / "fit" / "keypoints.json").read_text())
    assert saved["config"]["maps"]["sites"] == [f"transformer_blocks.{i}.{site}" for i in (0, 1)]
    assert np.isfinite(summary["final_loss"]) and summary["steps"] == 2


def test_keypoint_maps_on_joint_attention_are_distributions_over_the_tokens():
    from diffprobe.heads.keypoints.maps import MapSettings
    from diffprobe.training.keypoints import attention_maps

    bb = tiny_backbone("sd3")
    spec = MapSettings(tuple(default_sites(bb.probe.sites)), res=12, timestep=100)
    embeddings = torch.randn(6, bb.context_dim, requires_grad=True)
    maps = attention_maps(bb, spec, torch.rand(2, 3, 64, 64) * 2 - 1, embeddings, torch.Generator().manual_seed(0))
    assert maps.shape == (2, 6, 12, 12)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 12, 12))    # image keys' mass dropped, tokens renormalised
    maps[:, 0].sum().backward()
    assert float(embeddings.grad.abs().sum()) > 0
    from diffprobe.drives import encode_prompt

    cond = bb.family.context_conditioning(bb, embeddings.detach(), 2, (64, 64))   # the empty prompt's pooled
    torch.testing.assert_close(cond.added["pooled_projections"],                # CLIP embeddings, every row
                               encode_prompt(bb, [""]).added["pooled_projections"].expand(2, -1), rtol=0, atol=0)
    with pytest.raises(DiffprobeError, match="rotary embeddings"):
        attention_maps(tiny_backbone("flux"), MapSettings(tuple(default_sites(tiny_backbone("flux").probe.sites)), 8),
                       torch.zeros(1, 3, 64, 64), torch.randn(4, 32))


def test_transformer_defaults_for_keypoints_and_hyperfeatures():
    sites = tiny_backbone("pixart").probe.sites
    assert default_sites(sites) == ["transformer_blocks.0.attn2.hook_probs", "transformer_blocks.1.attn2.hook_probs"]
    assert layer_names(sites, ["auto"]) == ["transformer_blocks.0.hook_out", "transformer_blocks.1.hook_out"]
    assert resolve_raw_layer(sites, "auto") == "transformer_blocks.1.hook_out"
    unet = tiny_backbone("sd15").probe.sites
    assert resolve_raw_layer(unet, "auto") == RAW_LAYER
    assert len(layer_names(unet, ["auto"])) == 12   # the decoder residuals: 4 up blocks of 3, as in SD 1.5


def test_transformer_directory_with_parts_from_another(tmp_path):
    bb = tiny_backbone("pixart")
    save_backbone(bb, tmp_path / "full")   # PixArt pipeline layout: transformer/, vae/, text_encoder/, ...
    only = tmp_path / "dit"
    (only / "transformer").mkdir(parents=True)
    for f in (tmp_path / "full" / "transformer").iterdir():
        (only / "transformer" / f.name).write_bytes(f.read_bytes())
    (only / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    loaded = load_backbone({"path": str(only), "parts_from": str(tmp_path / "full"), "name": "dit"})
    assert loaded.family.name == "pixart" and loaded.context_dim == 32
    x = torch.randn(1, 4, 8, 8)
    from diffprobe.drives import encode_prompt, unet_call

    with torch.no_grad():
        torch.testing.assert_close(unet_call(loaded, x, 10, encode_prompt(loaded, ["a cat"])),
                                   unet_call(bb, x, 10, encode_prompt(bb, ["a cat"])))
    with pytest.raises(DiffprobeError, match="not a diffusers model directory"):
        load_backbone({"path": str(tmp_path / "nothing")})
    (only / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "FluxTransformer2DModel"]}))
    with pytest.raises(DiffprobeError, match="names FluxTransformer2DModel for transformer/, but .* describes a "
                                             "PixArtTransformer2DModel"):
        load_backbone({"path": str(only), "parts_from": str(tmp_path / "full")})
    weights = next((only / "transformer").glob("*.safetensors"))   # a weight missing from the file: refused, not
    tensors = load_file(weights)                                     # left uninitialised on the meta device
    del tensors[sorted(tensors)[3]]
    save_file(tensors, weights, metadata={"format": "pt"})
    (only / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    with pytest.raises(DiffprobeError, match="lacks weights PixArtTransformer2DModel needs"):
        load_backbone({"path": str(only), "parts_from": str(tmp_path / "full")})


def test_joint_image_block_is_renormalised_for_the_self_attention_heads():
    from diffprobe.heads.diffseg.sites import attention_groups, maps_by_grid
    from diffprobe.hooks import Site
    from diffprobe.runner import View

    joint = Site("b.attn.hook_img2img", "self_attn", "dit", 0, 2, 2, 16, 0, "b.attn", part="img2img", text_first=False)
    plain = Site("b.attn2.hook_probs", "self_attn", "dit", 0, 2, 2, 16, 1, "b.attn2")
    probs = torch.rand(1, 4, 4)
    probs = probs / probs.sum(-1, keepdim=True)
    view = View.from_tensors({joint.name: joint, plain.name: plain}, {joint.name: 0.6 * probs, plain.name: probs},
                             grids={joint.name: (2, 2), plain.name: (2, 2)})
    groups = attention_groups(view.sites)
    assert groups == {2: [joint.name, plain.name]}
    maps = maps_by_grid(view, groups)[(2, 2)]          # the joint block had 40 % of each row's mass on text
    torch.testing.assert_close(maps[0], probs[0])
    assert torch.equal(maps[1], probs[0])              # plain self-attention is passed through untouched


def test_sd3_conditioning_flow_drive_and_directory_round_trip(tmp_path):
    from diffprobe.drives import Drive, encode_prompt, generate, run_drive, unet_call

    bb = tiny_backbone("sd3")
    cond = encode_prompt(bb, ["a cat", ""])
    assert cond.context.shape == (2, 77 + 256, 32) and cond.added["pooled_projections"].shape == (2, 16)
    embeds, _, pooled, _ = bb.family.pipeline(bb).encode_prompt("a cat", None, None, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.context[:1], embeds)     # the pipeline's: T5 padded to its 256, not T5's 512
    torch.testing.assert_close(cond.added["pooled_projections"][:1], pooled)
    assert torch.equal(cond.context[:, :77, 16:], torch.zeros(2, 77, 16))   # CLIP states zero-padded to 32
    x, e = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(bb.family.noisy_latents(bb, x, e, 250), 0.75 * x + 0.25 * e)   # rectified flow
    with pytest.raises(DiffprobeError, match="flow-matching model"):
        run_drive(bb, Drive(process="inversion", num_steps=2), x, encode_prompt(bb, ["a cat"]))
    images, _ = generate(bb, ["a cat"], guidance=2.0, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    save_backbone(bb, tmp_path / "sd3")
    loaded = load_backbone({"path": str(tmp_path / "sd3"), "name": "sd3"})
    assert loaded.family.name == "sd3" and loaded.text_encoder_3 is not None and loaded.latent_shift == 0.1
    assert type(loaded.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    with torch.no_grad():
        torch.testing.assert_close(unet_call(loaded, x, 500, encode_prompt(loaded, ["a cat"])),
                                   unet_call(bb, x, 500, encode_prompt(bb, ["a cat"])))


def test_flux_conditioning_and_packing_are_its_pipelines_and_the_directory_round_trips(tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from diffprobe.drives import encode_prompt, generate, unet_call

    bb = tiny_backbone("flux")
    assert bb.sample_size == 64 and bb.grid_factor == 16 and bb.check_image_size(48) == 48
    with pytest.raises(DiffprobeError, match="multiple of 16"):
        bb.check_image_size(56)
    cond = encode_prompt(bb, ["a cat", ""])
    pipe = bb.family.pipeline(bb)
    context, pooled, text_ids = pipe.encode_prompt(["a cat", ""], None)   # its default max_sequence_length, 512
    torch.testing.assert_close(cond.context, context, rtol=0, atol=0)
    torch.testing.assert_close(cond.added["pooled_projections"], pooled, rtol=0, atol=0)
    # one call: latents packed into 2x2 tokens with position ids, t as a fraction, unpacked, as the pipeline does
    x = torch.randn(2, 4, 8, 12)
    packed = FluxPipeline._pack_latents(x, 2, 4, 8, 12)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 6, x.device, x.dtype)
    with torch.no_grad():
        out = bb.unet(hidden_states=packed, timestep=torch.full((2,), 0.25), guidance=None, pooled_projections=pooled,
                      encoder_hidden_states=context, txt_ids=text_ids, img_ids=ids).sample
        want = FluxPipeline._unpack_latents(out, 64, 96, 8)
        torch.testing.assert_close(unet_call(bb, x, 250, cond), want, rtol=0, atol=1e-6)
    # generation as FluxPipeline samples: no classifier-free rows, shifted sigmas from 1 to 1/n, the same latents
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    images, final = generate(bb, ["a cat"], num_steps=3, latents=start)   # FLUX's default guidance: 3.5
    packed = pipe(prompt="a cat", height=64, width=64, num_inference_steps=3, guidance_scale=3.5, output_type="latent",
                  latents=FluxPipeline._pack_latents(start, 1, 4, 8, 8)).images
    torch.testing.assert_close(final, FluxPipeline._unpack_latents(packed, 64, 64, 8), rtol=0, atol=1e-5)
    assert images.shape == (1, 3, 64, 64) and not torch.equal(final, start)
    # a guidance-distilled FLUX (FLUX.1-dev) gets the scale in its guidance embedding: 3.5 unless given
    from diffprobe.loading import family_of_structure

    torch.manual_seed(0)
    bb.unet = FluxTransformer2DModel(**{**family_of_structure("flux").tiny_configs["flux"], "guidance_embeds": True}).eval()
    bb.unet.register_to_config(sample_size=8)
    pipe = bb.family.pipeline(bb)
    for scale in (3.5, 7.5):
        packed = pipe(prompt="a cat", height=64, width=64, num_inference_steps=2, guidance_scale=scale,
                      output_type="latent", latents=FluxPipeline._pack_latents(start, 1, 4, 8, 8),
                      ).images
        _, final = generate(bb, ["a cat"], num_steps=2, latents=start, guidance=None if scale == 3.5 else scale)
        torch.testing.assert_close(final, FluxPipeline._unpack_latents(packed, 64, 64, 8), rtol=0, atol=1e-5)
    assert not torch.equal(final, generate(bb, ["a cat"], num_steps=2, latents=start)[1])
    save_backbone(bb, tmp_path / "flux")
    loaded = load_backbone({"path": str(tmp_path / "flux"), "name": "flux"})
    assert loaded.family.name == "flux" and type(loaded.text_encoder_2).__name__ == "T5EncoderModel"
    assert loaded.latent_shift == 0.1 and loaded.grid_factor == 16
    with torch.no_grad():
        torch.testing.assert_close(unet_call(loaded, x, 250, encode_prompt(loaded, ["a cat", ""])),
                                   unet_call(bb, x, 250, cond))


@pytest.mark.parametrize("structure", ["sd15"] + [m[len("tiny_"):] for m in TRANSFORMER_MODELS])
def test_text_length_is_site_metadata_known_before_the_model_runs(structure):
    from diffprobe.drives import encode_prompt
    from diffprobe.hooks import Need, Reduce

    bb = tiny_backbone(structure)
    context = encode_prompt(bb, ["a cat"]).context.shape[1]
    known = {"sd15": 77, "pixart": 300, "sd3": 77 + 256, "flux": 512, "auraflow": 256}   # the pipelines' lengths
    assert context == known.get(structure, context)
    tokens = context + bb.text_streams[0].offset   # AuraFlow's model puts its 8 register tokens first
    sites = bb.probe.sites
    text = [s for s in sites.values() if s.kind in ("cross_attn", "joint_attn", "txt2img", "txt2txt")]
    assert text and all(s.text_tokens == tokens for s in text)
    assert all(s.text_tokens is None for s in sites.values() if s.kind not in ("cross_attn", "joint_attn", "txt2img",
                                                                               "txt2txt"))
    need = Need([s.name for s in text], Reduce(heads="mean"))
    assert bb.probe.bytes_per_call(need, (8, 8)) == bb.probe.bytes_per_call(need, (8, 8), tokens=tokens)
    assert bb.probe.bytes_per_call(need, (8, 8)) != bb.probe.bytes_per_call(need, (8, 8), tokens=tokens + 1)


def test_a_generation_pass_on_flux_captures_its_rows_without_unconditional_ones():
    from diffprobe.drives import Drive, generate
    from diffprobe.hooks import Need, Reduce
    from diffprobe.runner import Plan, run_plans

    bb = tiny_backbone("flux")
    need = Need("transformer_blocks.0.attn.hook_img2txt", Reduce(heads="mean", steps="all"))
    plan = Plan(Drive(process="generation", num_steps=2, guidance=3.5), (need,), prompt=("a cat", "a dog"))
    (view,) = run_plans(bb, [plan], [None], torch.Generator().manual_seed(0))
    site = "transformer_blocks.0.attn.hook_img2txt"
    assert view[site].shape == (2, 2, 16, 512) and len(view.timesteps) == 2   # (steps, prompts, 4 x 4 tokens, T5 512)
    images, _ = generate(bb, ["a cat", "a dog"], guidance=3.5, num_steps=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(view.images, images)
