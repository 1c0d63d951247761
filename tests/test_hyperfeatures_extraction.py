"""Extraction: residual sites are the ResNet residual branch; saved steps; memory independent of S."""

import gc

import pytest
import torch
from hyperfeatures_fixtures import tiny_sd15

from diffprobe.errors import DiffprobeError
from diffprobe.heads.hyperfeatures.extract import (
    ExtractionSettings,
    extract_descriptors,
    extract_features,
    run_extraction,
)
from diffprobe.heads.hyperfeatures.network import AggregationNetwork, AggregatorSettings

LAYERS = "up_blocks.*.resnets.*.hook_residual"


@pytest.fixture(scope="module")
def model():
    return tiny_sd15()


def test_residual_site_equals_block_output_times_scale_minus_shortcut(model):
    bb, probe = model
    names = probe.select(LAYERS)
    seen = {}

    def plain_hook(module_name):
        def hook(module, args, kwargs, output):
            seen[module_name] = (args[0] if args else kwargs["input_tensor"], output)
        return hook

    handles = [bb.unet.get_submodule(probe.sites[n].module).register_forward_hook(plain_hook(n), with_kwargs=True)
               for n in names]
    torch.manual_seed(0)
    lat = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 77, bb.context_dim)
    try:
        with torch.no_grad(), probe.capture(names) as cache:
            bb.unet(lat, 500, encoder_hidden_states=ctx)
    finally:
        for h in handles:
            h.remove()
    for n in names:
        block = bb.unet.get_submodule(probe.sites[n].module)
        x, out = seen[n]
        with torch.no_grad():
            shortcut = block.conv_shortcut(x) if block.conv_shortcut is not None else x
        expected = out * block.output_scale_factor - shortcut
        torch.testing.assert_close(cache[n], expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(cache[n], out, atol=1e-3)  # the residual branch is not the block output


def test_default_saved_steps_are_the_reference_calls():
    cfg = ExtractionSettings()
    assert cfg.saved_calls() == [0, 4, 9, 14, 19, 24, 29, 34, 39, 44, 49]
    # with 50 inversion calls at t = -1, 0, 20, ..., 960 these are t = -1, 60, 160, ..., 960
    t = [-1] + [20 * i for i in range(49)]
    assert [t[i] for i in cfg.saved_calls()] == [-1, 60, 160, 260, 360, 460, 560, 660, 760, 860, 960]
    assert ExtractionSettings(process="one_step").saved_calls() == [0]
    with pytest.raises(DiffprobeError):
        ExtractionSettings(process="noise")
    with pytest.raises(DiffprobeError):
        ExtractionSettings(num_steps=4, saved_steps=[5])


def test_consumer_gets_each_saved_step_once_with_its_timestep(model):
    bb, probe = model
    cfg = ExtractionSettings(num_steps=5, save_every=2, image_size=64)  # calls t=-1,0,200,400,600 -> keep 0,2,4
    got = []
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    ts, generated = run_extraction(bb, x, cfg, lambda s, f: got.append((s, sorted(f))))
    assert generated is None
    assert [s for s, _ in got] == [0, 1, 2]
    assert ts == [-1.0, 200.0, 600.0]
    assert got[0][1] == sorted(probe.select(LAYERS))


def _held_bytes(root) -> int:
    """Bytes of the distinct tensor storages reachable from `root` (modules and their parameters skipped)."""
    seen_obj, seen_st, total, todo = set(), set(), 0, [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen_obj or isinstance(obj, (torch.nn.Module, type, str, bytes)):
            continue
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            if st.data_ptr() not in seen_st:
                seen_st.add(st.data_ptr())
                total += st.nbytes()
            continue
        todo.extend(gc.get_referents(obj))
    return total


def _peak_held(bb, cfg, consume, state):
    """Largest number of tensor bytes the consumer's state holds after any saved step."""
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    peaks = []

    def measured(s, feats):
        consume(s, feats)
        peaks.append(_held_bytes(state))

    run_extraction(bb, x, cfg, measured)
    return max(peaks)


def test_streaming_memory_does_not_grow_with_saved_steps_but_holding_does(model):
    bb, probe = model
    names = probe.select(LAYERS)
    peaks = {}
    for S in (1, 4):
        cfg = ExtractionSettings(num_steps=S, save_every=1, image_size=64)
        assert cfg.num_saved == S
        torch.manual_seed(0)
        net = AggregationNetwork(AggregatorSettings.from_sites([probe.sites[n] for n in names], S,
                                                             output_size=16, projection_dim=32))
        with torch.no_grad():
            agg = net.stream()
            peaks["stream", S] = _peak_held(bb, cfg, agg.add, agg)
        held = []
        peaks["hold", S] = _peak_held(bb, cfg, lambda s, f: held.append(f), held)
    # streaming holds one (1, D, H, H) running sum plus the (L, S) softmax weights (12 * S floats)
    assert peaks["stream", 1] - 12 * 1 * 4 == peaks["stream", 4] - 12 * 4 * 4 == 32 * 16 * 16 * 4
    assert peaks["hold", 4] == 4 * peaks["hold", 1]


def test_descriptors_and_features_agree(model):
    bb, probe = model
    names = probe.select(LAYERS)
    cfg = ExtractionSettings(num_steps=3, save_every=1, image_size=64, sample_latent=False)
    torch.manual_seed(0)
    net = AggregationNetwork(AggregatorSettings.from_sites([probe.sites[n] for n in names], 3,
                                                         output_size=16, projection_dim=32))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        streamed = extract_descriptors(bb, net, x, cfg)
        held = net(extract_features(bb, x, cfg, layers=names))
    assert streamed.shape == (1, 32, 16, 16)
    torch.testing.assert_close(streamed, held)


def test_generation_steps_are_mirrored_into_noise_order_and_keep_the_cond_half(model):
    bb, probe = model
    cfg = ExtractionSettings(process="generation", num_steps=4, save_every=2, image_size=64)  # inversion calls 0, 1, 3
    got = {}
    ts, images = run_extraction(bb, None, cfg, lambda s, f: got.setdefault(s, f), prompts=["a cat", "a dog"])
    assert images.shape == (2, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    # generation calls run 4 -> 1 in noise; inversion calls [0, 1, 3] mirror to generation calls [3, 2, 0]
    assert ts == sorted(ts) and len(ts) == 3
    assert all(f.shape[0] == 2 for f in got[0].values())  # the [uncond; cond] batch of 4 keeps the cond half
    with pytest.raises(DiffprobeError, match="prompts"):
        run_extraction(bb, None, cfg, lambda s, f: None)


def test_one_step_on_a_flow_matching_model_is_one_call_on_the_clean_latent():
    """FLUX's one-step extraction is the one call at sigma 0 on the image's clean latent (what t=-1 is for DDPM);
    a longer DDIM inversion of a flow-matching model is refused, pointing to what works."""
    from diffprobe.drives import encode_images, encode_prompt, unet_call
    from diffprobe.loading import tiny_backbone

    bb = tiny_backbone("flux")
    cfg = ExtractionSettings(layers="auto", process="one_step", image_size=64, sample_latent=False)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    got = {}
    ts, _ = run_extraction(bb, x, cfg, lambda s, f: got.update({s: f}))
    assert ts == [0.0] and list(got) == [0]
    names = sorted(got[0])
    with torch.no_grad(), bb.probe.capture(names) as cache:
        unet_call(bb, encode_images(bb, x), 0, encode_prompt(bb, [""], (64, 64)))
    for name in names:
        torch.testing.assert_close(got[0][name], cache[name], rtol=0, atol=0)
    with pytest.raises(DiffprobeError, match="process=one_step"):
        run_extraction(bb, x, ExtractionSettings(layers="auto", num_steps=3, image_size=64), lambda s, f: None)
