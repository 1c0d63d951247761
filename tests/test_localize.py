"""Localisation: WSOL metrics on hand-computed boxes, refinement on planted attention, the head and task."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffprobe.errors import DiffprobeError
from diffprobe.eval.wsol import WSOLMeter, box_iou, component_boxes, largest_box, pixel_average_precision
from diffseg_planted import planted_attention
from diffprobe.heads.localize import LocalizeHead, LocalizeSettings, RefineSettings, refine
from diffprobe.hooks import Site
from diffprobe.runner import Item, View


def test_boxes_and_iou_by_hand():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:7] = True       # 12 px
    mask[7, 10] = True          # 1 px, diagonal neighbour of nothing
    boxes, areas = component_boxes(mask)
    assert sorted(map(tuple, boxes.tolist())) == [(3, 2, 7, 5), (10, 7, 11, 8)] and sorted(areas) == [1, 12]
    assert largest_box(mask).tolist() == [3, 2, 7, 5] and largest_box(np.zeros((3, 3), bool)) is None
    np.testing.assert_allclose(box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]]),
                               [[1 / 3, 1.0, 0.0]])


def test_wsol_scores_by_hand():
    meter = WSOLMeter()
    perfect = np.zeros((40, 40))
    perfect[10:20, 10:30] = 1.0
    meter.update(perfect, [[10, 10, 30, 20]], perfect > 0)
    third = np.zeros((40, 40))
    third[0:10, 5:15] = 1.0                      # IoU 1/3 with the box (0, 0, 10, 10)
    meter.update(third, [[0, 0, 10, 10], [30, 30, 40, 40]], None)   # the second box is another instance
    r = meter.result()
    assert r["images"] == 2 and r["gt_known_loc"] == pytest.approx(50.0)
    assert (r["max_box_acc@0.3"], r["max_box_acc@0.5"], r["max_box_acc@0.7"]) == pytest.approx((100.0, 50.0, 50.0))
    assert r["max_box_acc_v2"] == pytest.approx(200 / 3)
    assert r["pxap"] == pytest.approx(100.0)     # the first image's map is its mask


def test_pixel_average_precision_by_hand():
    # pixels by heat: 1.0 (object), 0.6 (background), 0.3 (object), 0.0 (background)
    meter = WSOLMeter()
    meter.update(np.array([[1.0, 0.6], [0.3, 0.0]]), [[0, 0, 1, 2]], np.array([[True, False], [True, False]]))
    # from the top: recall 0.5 at precision 1, then recall 1 at precision 2/3
    assert meter.result()["pxap"] == pytest.approx(100 * (0.5 * 1 + 0.5 * 2 / 3))
    with pytest.raises(DiffprobeError, match="ground-truth pixel"):
        pixel_average_precision(np.zeros(3), np.ones(3), 0.0)


def planted(side=16):
    """A square object on a background: the object's segmentation, its self-attention, and a word map
    that is the object blurred into the background (a leaky cross-attention)."""
    seg = torch.zeros(side, side, dtype=torch.long)
    seg[4:11, 5:12] = 1
    probs = planted_attention(seg, side)[0]
    blur = F.avg_pool2d(seg[None, None].float(), 7, 1, 3, count_include_pad=False)[0, 0]
    return seg, probs, blur.reshape(1, -1)


@pytest.mark.parametrize("params", [RefineSettings("diffusion", beta=10.0), RefineSettings("diffusion", graph="attention"),
                                    RefineSettings("power", power=2), RefineSettings("walk", restart=0.7)])
def test_refinement_leaks_less_than_the_raw_map(params):
    seg, probs, word = planted()
    inside = seg.reshape(-1) == 1

    def leak(x):
        x = x[0] - x[0].min()
        return float(x[~inside].sum() / x.sum())

    refined = refine(word, probs, (16, 16), params)
    assert leak(refined) < 0.8 * leak(word), params


def test_the_head_localises_a_planted_word_and_boxes_it():
    seg, probs, word = planted()
    sites = {"b.attn1.hook_probs": Site("b.attn1.hook_probs", "self_attn", "up", 0, 1, 1, 8, 0, "b.attn1"),
             "b.attn2.hook_probs": Site("b.attn2.hook_probs", "cross_attn", "up", 0, 1, 1, 8, 1, "b.attn2")}
    cross = torch.full((256, 5), 1e-3)
    cross[:, 2] = word[0]                            # token 2 ("bird" in "a bird") carries the word map
    tensors = {"b.attn1.hook_probs": probs[None], "b.attn2.hook_probs": (cross / cross.sum(1, keepdim=True))[None]}
    head = LocalizeHead(LocalizeSettings(words=["bird"], threshold=0.5), [[2]], 64)
    head.plan(sites)
    result = head.finish(View.from_tensors(sites, tensors), Item("planted", None, {"output_size": (64, 64)}))
    assert result.words == ["bird"] and result.masks.shape == (1, 64, 64)
    truth = np.array([5 * 4, 4 * 4, 12 * 4, 11 * 4], np.float64)    # the object in 64 px
    assert box_iou(result.boxes[0][None], truth[None])[0, 0] > 0.7
    assert box_iou(result.boxes[0][None], truth[None])[0, 0] > box_iou(
        largest_box(result.raw[0].numpy() >= 0.5)[None], truth[None])[0, 0]


def test_divisors_leave_out_a_flat_finer_level():
    # the planted 16 x 16 level at divisor 2 under a uniform 32 x 32 level at divisor 1 (a model whose finest
    # self-attention has not learned structure): reading all levels, the flat one gets the largest weight and
    # the graph and the word map lose the object; divisors=[2] reads the planted level alone, exactly.
    seg, probs, word = planted()
    sites = {"f.attn1.hook_probs": Site("f.attn1.hook_probs", "self_attn", "up", 1, 1, 1, 8, 2, "f.attn1"),
             "f.attn2.hook_probs": Site("f.attn2.hook_probs", "cross_attn", "up", 1, 1, 1, 8, 3, "f.attn2"),
             "b.attn1.hook_probs": Site("b.attn1.hook_probs", "self_attn", "up", 0, 2, 1, 8, 0, "b.attn1"),
             "b.attn2.hook_probs": Site("b.attn2.hook_probs", "cross_attn", "up", 0, 2, 1, 8, 1, "b.attn2")}
    cross = torch.full((256, 5), 1e-3)
    cross[:, 2] = word[0]
    tensors = {"b.attn1.hook_probs": probs[None], "b.attn2.hook_probs": (cross / cross.sum(1, keepdim=True))[None],
               "f.attn1.hook_probs": torch.full((1, 1024, 1024), 1 / 1024),
               "f.attn2.hook_probs": torch.full((1, 1024, 5), 0.2)}
    item = Item("planted", None, {"output_size": (64, 64)})
    truth = np.array([[5 * 4, 4 * 4, 12 * 4, 11 * 4]], np.float64)

    def box_iou_of(divisors, names):
        head = LocalizeHead(LocalizeSettings(words=["bird"], divisors=divisors), [[2]], 64)
        head.plan({n: sites[n] for n in names})
        result = head.finish(View.from_tensors(sites, {n: tensors[n] for n in names}), item)
        return result, box_iou(result.boxes[0][None], truth)[0, 0]

    alone, iou_alone = box_iou_of(None, ["b.attn1.hook_probs", "b.attn2.hook_probs"])
    selected, iou_selected = box_iou_of([2], list(tensors))
    _, iou_all = box_iou_of(None, list(tensors))
    torch.testing.assert_close(selected.refined, alone.refined)
    assert iou_selected == iou_alone > 0.7 > iou_all
    with pytest.raises(DiffprobeError, match=r"localize.divisors \[4\] are not attention levels .*\[1, 2\]"):
        LocalizeHead(LocalizeSettings(words=["bird"], divisors=[4]), [[2]], 64).plan(sites)


def test_bad_localize_settings_are_one_line_errors():
    with pytest.raises(DiffprobeError, match="words"):
        LocalizeSettings().params()
    with pytest.raises(DiffprobeError, match="method"):
        LocalizeSettings(words=["bird"], method="crf").params()
    with pytest.raises(DiffprobeError, match="threshold"):
        LocalizeSettings(words=["bird"], threshold=1.0).params()
    with pytest.raises(DiffprobeError, match="localize.divisors must be"):
        LocalizeSettings(words=["bird"], divisors=[]).params()
    with pytest.raises(DiffprobeError, match="ground-truth box"):
        WSOLMeter().update(np.ones((4, 4)), np.zeros((0, 4)))


def test_localize_task_on_the_demo_scene_writes_its_files(tmp_path):
    import json

    from config_helpers import make_cfg

    from diffprobe.tasks import localize

    summary = localize.run(make_cfg("localize", model="mini"), tmp_path)
    out = tmp_path / "demo_scene"
    record = json.loads((out / "localization.json").read_text())
    assert [w["word"] for w in record["words"]] == ["face", "house", "square"]   # the caption's things
    for w in record["words"]:
        x0, y0, x1, y1 = w["box"]
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256 and (out / f"{w['word']}_mask.png").is_file()
    assert (out / "figure.png").is_file() and (out / "maps.safetensors").is_file()
    assert list(summary["images"].values())[0]["boxes"]["face"] == record["words"][0]["box"]


def test_localize_eval_scores_world_birds_in_the_cub_layout(tmp_path):
    from config_helpers import make_cfg

    from diffprobe.data.world import render_scene, scene_seed
    from diffprobe.data.world.export import write_cub
    from diffprobe.tasks import localize_eval

    birds = [render_scene(scene_seed("test", i), first="bird", closeup=True) for i in range(4)]
    root = write_cub(tmp_path / "cub", birds[:2], birds[2:])
    report = localize_eval.run(make_cfg("localize_eval", model="mini", data={"name": "cub", "root": str(root)}),
                               tmp_path / "eval")
    rows = report["results"]
    assert set(rows) == {"diffusion (refined)", "raw cross-attention"} and rows["raw cross-attention"]["images"] == 2
    assert (tmp_path / "eval" / "metrics.md").read_text().startswith("Localisation of 'bird' on CUB test (2 images")


def test_a_word_outside_the_prompt_is_a_one_line_cli_error(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "diffprobe", "task=localize", "words=[cat]", "prompt=a red bird",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'cat' is not found in the tokenised prompt" in proc.stderr


def test_gt_known_at_a_fixed_threshold_is_what_that_threshold_gives():
    """A map whose box is right only above 0.5 (a weaker blob elsewhere joins below it): GT-known at the best
    threshold is 100 %, at a fixed 0.3 it is 0 % (the largest component then spans both)."""
    heat = np.zeros((40, 40))
    heat[5:15, 5:15] = 1.0
    heat[15:35, 5:15] = 0.4
    meter = WSOLMeter()
    meter.update(heat, [[5, 5, 15, 15]])
    assert meter.result()["gt_known_loc"] == 100.0
    assert meter.gt_known_at(0.7) == 100.0 and meter.gt_known_at(0.3) == 0.0
