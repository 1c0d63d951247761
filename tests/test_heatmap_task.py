"""task=heatmap and its head: a planted cross-attention map gives the word's heat map where it was planted, the
per-step maps and the mean come from the same maps, and the task writes, resumes and refuses as a run should."""

import json

import pytest
import torch
from safetensors.torch import load_file

from config_helpers import make_cfg
from diffprobe.errors import DiffprobeError
from diffprobe.heads.heatmap import HeatmapHead, HeatmapSettings
from diffprobe.hooks import ActivationCache, Reduce
from diffprobe.loading import tiny_backbone
from diffprobe.runner import Item, View
from diffprobe.tasks import heatmap


def _planted_view(bb, steps: int | None):
    """Every cross-attention site puts all of column 5's mass on one cell of its grid (the image's top-left
    quarter) at step 1 and on its bottom-right quarter at the other steps; (heads, Q, T) per row."""
    sites = {n: s for n, s in bb.probe.sites.items() if s.kind == "cross_attn"}
    tensors, grids = {}, {}
    for name, site in sites.items():
        side = 64 // (bb.grid_factor * site.divisor)
        maps = torch.full((steps or 1, 1, site.heads, side * side, 77), 1e-4)
        corner = torch.zeros(side, side)
        corner[side // 2:, side // 2:] = 1
        maps[..., 5] = corner.flatten()
        if steps:
            early = torch.zeros(side, side)
            early[: side // 2, : side // 2] = 1
            maps[1, ..., 5] = early.flatten()
        tensors[name] = maps if steps else maps[0]
        grids[name] = (side, side)
    reduce = Reduce(heads="none", steps="all" if steps else "mean")
    view = View([ActivationCache.from_tensors(bb.probe.sites, tensors, grids, reduce=reduce)])
    view.images = torch.rand(1, 3, 64, 64)
    return view


def test_a_planted_map_lights_up_where_it_was_planted_and_per_step_maps_share_the_mean():
    bb = tiny_backbone("sd15")
    head = HeatmapHead(HeatmapSettings(steps=3), 64, "a red cat", [[5], [2]], bb.grid_factor)
    out = head.finish(_planted_view(bb, None), Item("a red cat"))
    cat = out["maps"][0]
    assert out["maps"].shape == (2, 64, 64) and out["per_step"] is None
    assert cat[40:, 40:].mean() > 20 * cat[:24, :24].mean()      # the bottom-right quarter, planted
    assert out["maps"][1].max() < 0.01 * cat.max()                  # column 2 holds nothing
    stepped = HeatmapHead(HeatmapSettings(steps=3, per_step=True), 64, "a red cat", [[5]], bb.grid_factor)
    out = stepped.finish(_planted_view(bb, 3), Item("a red cat"))
    per = out["per_step"][:, 0]
    assert per.shape == (3, 64, 64)
    assert per[1][:24, :24].mean() > 20 * per[1][40:, 40:].mean()   # step 1 was planted top-left
    assert per[0][40:, 40:].mean() > 20 * per[0][:24, :24].mean()
    # the mean map is DAAM's map of the maps averaged over the steps (not the mean of the steps' maps)
    flat = head.finish(_averaged(bb), Item("a red cat"))["maps"][0]
    torch.testing.assert_close(out["maps"][0], flat, rtol=1e-5, atol=1e-6)


def _averaged(bb):
    view = _planted_view(bb, 3)
    cache = view.caches[0]
    tensors = {n: cache[n].mean(0) for n in cache.names}
    mean = View([ActivationCache.from_tensors(bb.probe.sites, tensors, {n: cache.grid(n) for n in tensors},
                                              reduce=Reduce(heads="none", steps="mean"))])
    mean.images = view.images
    return mean


def test_the_task_writes_every_prompts_files_resumes_and_refuses_other_settings(tmp_path):
    cfg = make_cfg("heatmap", prompt=["a red cat", "a dog"], steps=2, per_step=True)
    summary = heatmap.run(cfg, tmp_path)
    assert [p["prompt"] for p in summary["prompts"]] == ["a red cat", "a dog"]
    first = tmp_path / summary["prompts"][0]["folder"]
    for name in ("image.png", "heatmaps.png", "heatmaps.safetensors", "heatmaps.json", "report.html"):
        assert (first / name).is_file()
    saved = load_file(first / "heatmaps.safetensors")
    assert set(saved) == {"word/a", "word/red", "word/cat", "per_step/a", "per_step/red", "per_step/cat"}
    assert saved["word/cat"].shape == (64, 64) and saved["per_step/cat"].shape == (2, 64, 64)
    record = json.loads((first / "heatmaps.json").read_text())
    assert [w["word"] for w in record["words"]] == ["a", "red", "cat"] and record["words"][2]["tokens"] == ["cat</w>"]
    stamp = (first / "heatmaps.json").stat().st_mtime_ns
    heatmap.run(cfg, tmp_path)                                              # a rerun continues: nothing redone
    assert (first / "heatmaps.json").stat().st_mtime_ns == stamp
    with pytest.raises(DiffprobeError, match="other settings: settings.steps"):
        heatmap.run(make_cfg("heatmap", prompt=["a red cat", "a dog"], steps=3, per_step=True), tmp_path)


def test_bad_input_is_refused_before_any_generation(tmp_path):
    with pytest.raises(DiffprobeError, match="needs prompt="):
        heatmap.settings_of(make_cfg("heatmap"))
    with pytest.raises(DiffprobeError, match="steps must be"):
        heatmap.settings_of(make_cfg("heatmap", prompt="a cat", steps=0))
    with pytest.raises(DiffprobeError, match="'zebra' is not found"):
        heatmap.run(make_cfg("heatmap", prompt="a cat", words=["zebra"], steps=1), tmp_path / "w")
    assert not list((tmp_path / "w").glob("000_*"))


def test_a_real_image_gets_its_maps_from_its_inversion_under_the_caption(tmp_path):
    """image=: the head inverts the image (no generation) and maps the caption's words over it; one caption only."""
    import numpy as np
    from PIL import Image

    picture = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "photo.png")
    cfg = make_cfg("heatmap", prompt="a red cat", steps=2)
    cfg.image = str(tmp_path / "photo.png")
    heatmap.run(cfg, tmp_path / "out")
    folder = tmp_path / "out" / "photo"
    saved = load_file(folder / "heatmaps.safetensors")
    assert saved["word/cat"].shape == (64, 64) and float(saved["word/cat"].max()) > 0
    written = np.asarray(Image.open(folder / "image.png"))
    assert np.abs(written.astype(int) - picture.astype(int)).max() <= 1   # the image itself, not a generation
    assert json.loads((folder / "heatmaps.json").read_text())["image"].endswith("photo.png")
    cfg = make_cfg("heatmap", prompt=["a cat", "a dog"], steps=2)
    cfg.image = str(tmp_path / "photo.png")
    with pytest.raises(DiffprobeError, match="one prompt"):
        heatmap.run(cfg, tmp_path / "two")


@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_pixart", "tiny_sd3", "tiny_flux"])
def test_every_family_generates_and_maps_its_words(model, tmp_path):
    """SDXL (two CLIP encoders), PixArt (T5 with its mask), SD3 (a word in its CLIP and T5 columns), FLUX (T5, double-
    and single-stream blocks): one generation step, a non-empty map of every word at the image's size."""
    summary = heatmap.run(make_cfg("heatmap", model=model, prompt="a red cat", steps=1), tmp_path)
    folder = tmp_path / summary["prompts"][0]["folder"]
    saved = load_file(folder / "heatmaps.safetensors")
    record = json.loads((folder / "heatmaps.json").read_text())
    assert set(saved) == {"word/a", "word/red", "word/cat"}
    assert all(m.shape == (64, 64) and float(m.max()) > 0 for m in saved.values())
    cat = next(w for w in record["words"] if w["word"] == "cat")
    assert len(cat["columns"]) == (2 if model == "tiny_sd3" else 1)


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_flux"])
def test_concepts_leave_the_image_alone_and_are_concept_attentions_maps(model, tmp_path):
    """concepts=[...]: the generated image and the word maps are those of a run without concepts, bit for bit; each
    concept's map is what diffprobe.concepts.ConceptAttention gives over the same generation (its prompt rows,
    resized to the image), the maps sum to 1 over the concepts at every pixel, and the page gets one chip each."""
    import numpy as np
    from PIL import Image

    from diffprobe.concepts import ConceptAttention
    from diffprobe.runner import run_heads

    plain = heatmap.run(make_cfg("heatmap", model=model, prompt="a red cat", steps=2), tmp_path / "plain")
    cfg = make_cfg("heatmap", model=model, prompt="a red cat", steps=2, concepts=["cat", "dog", "red"])
    summary = heatmap.run(cfg, tmp_path / "with")
    a, b = (tmp_path / d / s["prompts"][0]["folder"] for d, s in (("plain", plain), ("with", summary)))
    assert np.array_equal(np.asarray(Image.open(a / "image.png")), np.asarray(Image.open(b / "image.png")))
    saved, bare = load_file(b / "heatmaps.safetensors"), load_file(a / "heatmaps.safetensors")
    assert all(torch.equal(saved[k], bare[k]) for k in bare)
    concepts = torch.stack([saved[f"concept/{c}"] for c in ("cat", "dog", "red")])
    torch.testing.assert_close(concepts.sum(0), torch.ones(64, 64))

    bb = tiny_backbone(model.removeprefix("tiny_"))
    head = HeatmapHead(HeatmapSettings(steps=2), 64, "a red cat", bb.word_positions("a red cat", ["cat"]),
                       bb.grid_factor)
    with ConceptAttention(bb, ["cat", "dog", "red"]) as ca:
        run_heads(bb, [head], Item("a red cat"), generator=torch.Generator().manual_seed(0))
    want = ca.image_maps((64, 64))[-1]                    # the prompt's row (after the unconditional one with CFG)
    torch.testing.assert_close(concepts, want)
    record = json.loads((b / "heatmaps.json").read_text())
    assert [c["concept"] for c in record["concepts"]] == ["cat", "dog", "red"]
    assert "[dog]" in (b / "report.html").read_text()
    with pytest.raises(DiffprobeError, match="concept_space"):
        heatmap.settings_of(make_cfg("heatmap", prompt="a cat", concepts=["cat"], concept_space="values"))
