"""The runner: heads that share a drive share one pass, get what separate runs give, and a site two heads
want is computed once; a head is testable on planted tensors without any model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffprobe.loading import tiny_backbone
from diffprobe.heads.diffseg.head import DiffSegHead, DiffSegSettings, WordMapsHead
from diffseg_planted import block_segmentation, planted_attention, same_partition
from diffprobe.heads.keypoints.maps import KeypointMapsHead, MapSettings, default_sites
from diffprobe.heads.probe import ProbeHead, ProbeSettings
from diffprobe.hooks import Site
from diffprobe.runner import Item, View, run_heads, run_plans
from diffprobe.tasks.diffseg_outputs import write_outputs


@pytest.fixture(scope="module")
def bb():
    return tiny_backbone("sd15")


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 72, 3), dtype=np.uint8))


def count_calls(bb):
    calls = []
    return calls, bb.unet.register_forward_pre_hook(lambda *a: calls.append(1))


def test_heads_with_equal_drives_share_one_pass_and_match_separate_runs(bb, image):
    settings = DiffSegSettings(tau=0.05, anchors=8)
    diffseg = DiffSegHead(settings, 64)
    probe = ProbeHead(ProbeSettings(sites=["*.attn1.hook_probs", "up_blocks.1.*.attn2.hook_probs"], timestep=300,
                                    crop="center", resize="bilinear_tf"), 64)
    item = Item("x", image)
    calls, handle = count_calls(bb)
    try:
        together = run_heads(bb, [diffseg, probe], item, generator=torch.Generator().manual_seed(0))
        assert len(calls) == 1  # one UNet call for both heads
        alone = [run_heads(bb, [h], item, generator=torch.Generator().manual_seed(0))[0] for h in (diffseg, probe)]
        assert len(calls) == 3
    finally:
        handle.remove()
    assert torch.equal(together[0].labels, alone[0].labels) and together[0].counts == alone[0].counts
    assert together[1].names == alone[1].names and len(alone[1].names) > 0
    for name in alone[1].names:
        torch.testing.assert_close(together[1][name], alone[1][name], rtol=0, atol=0)


def test_an_image_two_heads_share_with_other_prompts_is_encoded_once(bb, image, monkeypatch):
    settings = DiffSegSettings(tau=0.05, anchors=8)
    diffseg = DiffSegHead(settings, 64)
    probe = ProbeHead(ProbeSettings(sites=["up_blocks.1.*.attn2.hook_probs"], timestep=300, prompt="a cat",
                                    crop="center", resize="bilinear_tf"), 64)
    item = Item("x", image)
    encoded, encode = [], bb.vae.encode
    monkeypatch.setattr(bb.vae, "encode", lambda x, *a, **k: encoded.append(x.shape) or encode(x, *a, **k))
    together = run_heads(bb, [diffseg, probe], item, generator=torch.Generator().manual_seed(0))
    assert len(encoded) == 1  # two conditioning blocks (prompts "" and "a cat"), one image, one VAE call
    alone = [run_heads(bb, [h], item, generator=torch.Generator().manual_seed(0))[0] for h in (diffseg, probe)]
    assert len(encoded) == 3 and torch.equal(together[0].labels, alone[0].labels)
    for name in alone[1].names:  # a batch of two rows rounds differently from one row: equal to float tolerance
        torch.testing.assert_close(together[1][name], alone[1][name])


def test_a_site_two_heads_want_is_computed_once(bb, image, monkeypatch):
    computed = []
    original = type(bb.family).attention_qk

    def counting(self, module, hidden, context, mask):
        computed.append(module)
        return original(self, module, hidden, context, mask)

    monkeypatch.setattr(type(bb.family), "attention_qk", counting)
    settings = DiffSegSettings(tau=0.05, anchors=8)
    heads = [DiffSegHead(settings, 64), DiffSegHead(settings, 64)]  # same sites, image and prompt: same rows
    run_heads(bb, heads, Item("x", image))
    assert len(computed) == 16  # the 16 self-attention sites of SD 1.5, once each


def test_diffseg_with_words_writes_the_files_of_two_separate_runs(bb, image, tmp_path):
    words = ["cat", "dog"]
    settings = DiffSegSettings(tau=0.05, anchors=8)
    heads = [DiffSegHead(settings, 64), WordMapsHead(words, bb.word_positions("cat, dog", words), settings, 64)]
    item = Item("x", image)
    shared = run_heads(bb, heads, item)           # one pass: rows [""; "cat, dog"] of one batch
    separate = [run_heads(bb, [h], item)[0] for h in heads]
    from diffprobe.heads.diffseg.semantics import vote_words

    for name, (seg, maps) in {"shared": shared, "separate": separate}.items():
        labels = seg.labels.numpy()
        record_words = [words[v] for v in vote_words(seg.labels, maps)]
        write_outputs(tmp_path / name, "x", image.crop((12, 0, 60, 48)), labels, seg.num_segments,
                      {"counts": seg.counts}, record_words)
    for file in ("labels.png", "overlay.png", "segments.json", "figure.png"):
        if file == "figure.png":  # matplotlib writes metadata; compare the pixels
            a, b = (np.asarray(Image.open(tmp_path / n / file)) for n in ("shared", "separate"))
            assert np.array_equal(a, b)
        else:
            assert (tmp_path / "shared" / file).read_bytes() == (tmp_path / "separate" / file).read_bytes(), file


def test_noise_is_what_each_plan_draws_alone(bb):
    spec = MapSettings(tuple(default_sites(bb.probe.sites)), res=8, timestep=500, noise=True)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    heads = [KeypointMapsHead(spec, torch.randn(4, bb.context_dim, generator=torch.Generator().manual_seed(k)), 64)
             for k in range(2)]  # different contexts: own rows, own noise draw from the same generator state
    plans = [h.plan(bb.probe.sites) for h in heads]
    together = run_plans(bb, plans, [x, x], torch.Generator().manual_seed(7))
    for head, plan, view in zip(heads, plans, together):
        (alone,) = run_plans(bb, [plan], [x], torch.Generator().manual_seed(7))
        torch.testing.assert_close(head.finish(view), head.finish(alone), rtol=0, atol=1e-6)


def test_a_head_runs_on_planted_tensors_without_a_model():
    # DiffSeg's head on a View built from planted self-attention: no UNet, no hooks
    seg = block_segmentation(16)
    sites, tensors = {}, {}
    for order, (side, divisor) in enumerate(((16, 1), (8, 2), (4, 4))):
        name = f"block{divisor}.attn1.hook_probs"
        sites[name] = Site(name, "self_attn", "up", 0, divisor, 1, 8, order, name[:-11])
        tensors[name] = planted_attention(seg, side, seed=side)  # (1, Q, Q): a batch of one
    head = DiffSegHead(DiffSegSettings(tau=0.9, anchors=8), 64)
    plan = head.plan(sites)
    assert plan.drive.timestep == 300 and not plan.drive.noise and plan.prompt == ""
    result = head.finish(View.from_tensors(sites, tensors), Item("planted", None, {"output_size": (16, 16)}))
    assert result.num_segments == 5 and same_partition(result.labels, seg)


def test_view_and_item_state_are_json_friendly(tmp_path):
    from diffprobe.items import IndexedRows, run_items

    rows = IndexedRows(3)
    state = run_items(3, lambda i: (lambda: rows.update(i, value=[i, i * i]) or {"i": i}), {"rows": rows}, tmp_path,
                      {"what": "squares"}, name="t")
    assert rows.result()["value"].tolist() == [[0, 0], [1, 1], [2, 4]]
    info = json.loads((tmp_path / "t_state.json").read_text())
    assert info["done"] == 3 and info["records"] == {"0": {"i": 0}, "1": {"i": 1}, "2": {"i": 2}}
    assert state.records[2] == {"i": 2}
