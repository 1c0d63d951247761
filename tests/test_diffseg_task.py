"""task=diffseg and task=diffseg_eval end to end on the tiny SD 1.5 model (maps mean nothing; the
plumbing, shapes, files, determinism and resume are what is checked)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from config_helpers import make_cfg

from diffprobe.loading import tiny_backbone
from diffprobe.data.coco_stuff import CocoStuff27
from diffprobe.data.labelled_images import center_crop_label
from diffprobe.errors import DiffprobeError
from diffprobe.eval.segmentation import PerImageHungarian
from diffprobe.heads.diffseg.head import DEFAULT_TAU, DiffSegHead, DiffSegSettings, default_tau
from diffprobe.runner import Item, run_heads, run_plans
from diffprobe.tasks import diffseg, diffseg_eval

CONF = Path(__file__).resolve().parent.parent / "conf"


def self_attention(bb, head, x):
    """{query grid: (L, Q, Q)} the head reads from one pass on image x (1, 3, S, S)."""
    (view,) = run_plans(bb, [head.plan(bb.probe.sites)], [x])
    return head.maps(view)


def write_image(path, w, h):
    rng = np.random.default_rng(w * h)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = [220, 40, 40]
    arr[h // 3:, w // 2:] = [40, 40, 220]
    arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_pipeline_groups_self_attention_by_divisor():
    bb = tiny_backbone("sd15")
    maps = self_attention(bb, DiffSegHead(DiffSegSettings(anchors=4, tau=0.9), 64), torch.zeros(1, 3, 64, 64))
    assert {g: tuple(m.shape) for g, m in maps.items()} == {
        (8, 8): (5, 64, 64), (4, 4): (5, 16, 16), (2, 2): (5, 4, 4), (1, 1): (1, 1, 1)}
    for m in maps.values():
        torch.testing.assert_close(m.sum(dim=-1), torch.ones(m.shape[:-1]))


def test_divisors_select_levels_and_segment_as_those_maps_alone():
    from diffprobe.heads.diffseg import segment

    bb = tiny_backbone("sd15")
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    item = Item("x", Image.fromarray(rgb), {"output_size": (64, 64)})
    every_head = DiffSegHead(DiffSegSettings(tau=0.05, anchors=4), 64)
    every = self_attention(bb, every_head, every_head.inputs(item))
    head = DiffSegHead(DiffSegSettings(tau=0.05, anchors=4, divisors=[4, 2]), 64)
    some = self_attention(bb, head, head.inputs(item))
    assert sorted(some) == [(2, 2), (4, 4)]  # 64 px -> latent 8 x 8: divisors 2 and 4
    for grid, maps in some.items():
        torch.testing.assert_close(maps, every[grid])
    (result,) = run_heads(bb, [head], item)
    alone = segment({g: every[g] for g in [(4, 4), (2, 2)]}, size=(64, 64), params=head.params)
    torch.testing.assert_close(result.labels, alone.labels)  # the finest selected grid is the aggregation grid
    with pytest.raises(DiffprobeError, match=r"divisors \[16\] are not attention levels .*\[1, 2, 4, 8\]"):
        DiffSegHead(DiffSegSettings(tau=0.9, divisors=[2, 16]), 64).plan(bb.probe.sites)
    for bad in ([], [0, 2], ["x"], 3):
        with pytest.raises(DiffprobeError, match="diffseg.divisors must be"):
            DiffSegSettings(tau=0.9, divisors=bad).params()


def test_divisors_default_to_the_models_then_all():
    assert diffseg.settings_of(make_cfg("diffseg")).divisors is None
    model = OmegaConf.merge(OmegaConf.load(CONF / "model" / "tiny_sd15.yaml"), {"attention_divisors": [2, 4]})
    assert list(diffseg.settings_of(make_cfg("diffseg", model=model)).divisors) == [2, 4]
    assert list(diffseg.settings_of(make_cfg("diffseg", model=model, divisors=[1])).divisors) == [1]


def test_pipeline_takes_the_resolutions_sdxl_has(caplog):
    bb = tiny_backbone("sdxl")
    head = DiffSegHead(DiffSegSettings(tau=0.9), 64)
    maps = self_attention(bb, head, torch.zeros(1, 3, 64, 64))
    assert {g: tuple(m.shape) for g, m in maps.items()} == {(4, 4): (10, 16, 16), (2, 2): (60, 4, 4)}
    image = Image.new("RGB", (64, 64))
    (result,) = run_heads(bb, [head], Item("x", image, {"output_size": (20, 30)}))
    assert result.labels.shape == (20, 30)
    assert "using 4" in caplog.text  # anchors clamped to the finest grid's side (64 px / 8 / divisor 2)


def test_diffseg_task_writes_labels_at_original_size(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "wide.png", 90, 50)
    write_image(images / "tall.jpg", 30, 70)
    cfg = make_cfg("diffseg", image=str(images), tau=0.02, anchors=8)
    summary = diffseg.run(cfg, tmp_path / "out")
    assert len(summary["images"]) == 2 and summary["skipped"] == {}
    for stem, (w, h) in {"wide": (90, 50), "tall": (30, 70)}.items():
        folder = tmp_path / "out" / stem
        labels = np.asarray(Image.open(folder / "labels.png"))
        record = json.loads((folder / "segments.json").read_text())
        assert labels.shape == (h, w) and record["size"] == {"width": w, "height": h}
        left, top, bw, bh = record["analysed_box"]
        assert (bw, bh) == (min(w, h),) * 2
        inside = labels[top:top + bh, left:left + bw]
        assert (labels == 255).sum() == w * h - bw * bh  # outside the centre square only
        k = record["num_segments"]
        np.testing.assert_array_equal(np.bincount(inside.ravel(), minlength=k),
                                      [s["pixels"] for s in record["segments"]])
        assert Image.open(folder / "overlay.png").size == (w, h)
        assert (folder / "figure.png").stat().st_size > 0
    first = (tmp_path / "out" / "wide" / "labels.png").read_bytes()
    diffseg.run(OmegaConf.merge(cfg, {"image": str(images / "wide.png")}), tmp_path / "again")
    assert (tmp_path / "again" / "wide" / "labels.png").read_bytes() == first  # deterministic


def test_diffseg_task_whole_image_and_words(tmp_path):
    write_image(tmp_path / "a.png", 40, 24)
    cfg = make_cfg("diffseg", image=str(tmp_path / "a.png"), crop="none", labels=["cat", "dog"], anchors=8)
    diffseg.run(cfg, tmp_path / "out")
    labels = np.asarray(Image.open(tmp_path / "out" / "a" / "labels.png"))
    assert labels.shape == (24, 40) and labels.max() < 255
    record = json.loads((tmp_path / "out" / "a" / "segments.json").read_text())
    assert all(s["word"] in ("cat", "dog") for s in record["segments"])
    with pytest.raises(DiffprobeError, match="crop"):
        diffseg.run(make_cfg("diffseg", image=str(tmp_path / "a.png"), crop="stretch"), tmp_path / "bad")
    with pytest.raises(DiffprobeError, match="iterations"):
        diffseg.run(make_cfg("diffseg", image=str(tmp_path / "a.png"), iterations=1), tmp_path / "bad")


def coco_fixture(root: Path, n: int = 3) -> Path:
    (root / "val2017").mkdir(parents=True)
    (root / "annotation_val2017").mkdir()
    ids = [f"{k:012d}" for k in range(1, n + 1)]
    for k, i in enumerate(ids):
        write_image(root / "val2017" / f"{i}.jpg", 80 + 8 * k, 60)
        lab = np.full((60, 80 + 8 * k), 156, np.uint8)
        lab[25:, : 40] = 0
        lab[:4] = 255
        Image.fromarray(lab).save(root / "annotation_val2017" / f"{i}.png")
    (root / "subset.txt").write_text("\n".join(ids))
    return root / "subset.txt"


def test_diffseg_eval_matches_direct_metrics_and_resumes(tmp_path):
    list_file = coco_fixture(tmp_path / "coco")
    data = {"name": "coco_stuff27", "root": str(tmp_path / "coco"), "list_file": str(list_file), "diffseg_tau": 1.1}
    cfg = make_cfg("diffseg_eval", data=data, anchors=8, tau=0.05, checkpoint_every=1)
    full = diffseg_eval.run(cfg, tmp_path / "full")
    assert [r["matching"] for r in full["results"]] == ["per_image", "dataset"]
    assert (tmp_path / "full" / "metrics.md").read_text().startswith("DiffSeg (tau ")

    # the same numbers computed directly from the head and the metric
    ds = CocoStuff27(tmp_path / "coco", list_file=list_file)
    bb, head = tiny_backbone("sd15"), DiffSegHead(DiffSegSettings(anchors=8, tau=0.05), 64)
    meter = PerImageHungarian(27)
    for i in range(len(ds)):
        image, label = ds.load(i)
        (result,) = run_heads(bb, [head], Item(str(i), image, {"output_size": (64, 64)}))
        meter.update(center_crop_label(label, 64), result.labels.numpy())
    assert meter.result() == full["results"][0]

    # interrupted at the third image (missing file), then resumed: same numbers as the full run
    missing = tmp_path / "coco" / "val2017" / "000000000003.jpg"
    missing.rename(missing.with_suffix(".bak"))
    with pytest.raises(DiffprobeError, match="image not found"):
        diffseg_eval.run(cfg, tmp_path / "part")
    assert json.loads((tmp_path / "part" / "eval_state.json").read_text())["done"] == 2
    missing.with_suffix(".bak").rename(missing)
    resumed = diffseg_eval.run(OmegaConf.merge(cfg, {"diffseg_eval": {"resume": str(tmp_path / "part")}}),
                               tmp_path / "rest")
    assert resumed["results"] == full["results"]
    with pytest.raises(DiffprobeError, match="other settings"):
        diffseg_eval.run(OmegaConf.merge(cfg, {"diffseg_eval": {"resume": str(tmp_path / "part")},
                                               "diffseg": {"tau": 0.5}}), tmp_path / "x")


@pytest.mark.skipif(not (Path(__file__).resolve().parent.parent / "diffprobe/assets/mini/model_index.json").is_file(),
                    reason="diffprobe-mini weights not built yet")
def test_pipeline_on_diffprobe_mini_uses_its_own_resolutions():
    from diffprobe.loading import load_backbone
    from diffprobe.data.world import demo_scene
    from diffprobe.mini import packaged_path

    bb = load_backbone({"name": "mini", "tiny": None, "path": str(packaged_path()), "repo_id": None})
    item = Item("demo", Image.fromarray(demo_scene(0).image), {"output_size": (64, 64)})
    every = DiffSegHead(DiffSegSettings(tau=0.002, merge="reference"), bb.sample_size)
    assert sorted(self_attention(bb, every, every.inputs(item))) == [(4, 4), (8, 8), (16, 16), (32, 32)]
    levels = OmegaConf.load(CONF / "model" / "mini.yaml").attention_divisors  # what task=diffseg reads on mini
    head = DiffSegHead(DiffSegSettings(tau=0.002, merge="reference", divisors=levels), bb.sample_size)
    maps = self_attention(bb, head, head.inputs(item))
    assert sorted(maps) == [(4, 4), (8, 8), (16, 16)]  # latent 32 x 32: the flat 32 x 32 level left out
    (res,) = run_heads(bb, [head], item)
    assert res.labels.shape == (64, 64) and res.num_segments >= 1


@pytest.mark.skipif(not (Path(__file__).resolve().parent.parent / "diffprobe/assets/mini/model_index.json").is_file(),
                    reason="diffprobe-mini weights not built yet")
def test_diffseg_eval_on_world_scenes_with_mini_beats_fixed_label_maps(tmp_path):
    # end to end against exact ground truth: world scenes written in the COCO-Stuff layout, read back by
    # the real reader, segmented by the packaged model at its own tau, scored with Hungarian matching
    from diffprobe.data.world import render_scene, scene_seed
    from diffprobe.data.world.export import write_coco_stuff
    from diffprobe.mini import packaged_path

    scenes = [render_scene(scene_seed("test", i)) for i in range(20)]
    root = write_coco_stuff(tmp_path / "world", scenes)
    data = {"name": "coco_stuff27", "root": str(root), "diffseg_tau": 1.1,
            "list_file": str(root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt")}
    model = OmegaConf.load(CONF / "model" / "mini.yaml")
    model.path = str(packaged_path())
    report = diffseg_eval.run(make_cfg("diffseg_eval", model=model, data=data), tmp_path / "out")
    assert f"tau {model.diffseg_tau}," in report["title"]  # the model's threshold, not the dataset's 1.1
    mini = report["results"][0]

    ds = CocoStuff27(root, list_file=data["list_file"])
    baselines = {"one segment": lambda h, w: np.zeros((h, w), np.int64),
                 "top/bottom": lambda h, w: (np.arange(h)[:, None] >= h // 2).repeat(w, 1).astype(np.int64)}
    for name, make in baselines.items():
        meter = PerImageHungarian(27)
        for i in range(len(ds)):
            label = center_crop_label(ds.load(i)[1], 64)
            meter.update(label, make(*label.shape))
        assert mini["miou"] > meter.result()["miou"] + 0.03, name
    assert 2 <= report["segments_per_image"] <= 8


def test_default_tau_prefers_the_models_calibration_then_the_datasets_then_the_reference():
    mini, sd = OmegaConf.create({"diffseg_tau": 0.2}), OmegaConf.create({"diffseg_tau": None})
    assert default_tau(mini, 1.1) == 0.2
    assert default_tau(sd, 1.1) == 1.1
    assert default_tau(sd) == DEFAULT_TAU == 0.9
    assert default_tau(OmegaConf.create({})) == 0.9  # a model config without the key
