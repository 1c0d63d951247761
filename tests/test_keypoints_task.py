"""task=keypoints end to end on the tiny SD 1.5 model: fit, predict, eval (plumbing, files, coordinates)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import config_helpers

from diffprobe.errors import DiffprobeError
from diffprobe.heads.keypoints.image_sets import ImageSet, LandmarkItem
from diffprobe.heads.keypoints.state import load_model, save_model
from diffprobe.tasks import keypoints
from diffprobe.tasks.keypoints_eval import collect, landmark_metric, mean_landmarks

CONF = Path(__file__).resolve().parent.parent / "conf"
SMALL = {"num_tokens": 8, "top_k": 2, "candidates": 4, "steps": 2, "fit.batch_size": 1, "upsample_queries": 16,
         "num_indices": 2, "preview": 1, "augmentations": 2, "predict.batch_size": 2}


def make_cfg(data=None, **overrides):
    return config_helpers.make_cfg("keypoints", data=data, **overrides)


def write_images(folder: Path, n: int, size=(80, 64)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        a = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        paths.append(folder / f"img{i}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("kp")
    write_images(root / "imgs", 3)
    out = root / "fit"
    summary = keypoints.run(make_cfg({"name": "folder", "root": str(root / "imgs")}, **SMALL), out)
    return root, out, summary


def test_fit_writes_model_curve_and_preview(fitted):
    _, out, summary = fitted
    model = load_model(out / "keypoints.safetensors")
    assert model.embeddings.shape == (8, 32) and model.num_keypoints == 2
    assert summary["indices"] == model.indices.tolist()
    for name in ("keypoints.json", "loss_curve.png", "loss_curve.json", "checkpoint.safetensors", "summary.json"):
        assert (out / name).is_file(), name
    assert len(json.loads((out / "loss_curve.json").read_text())) == 2
    assert (out / "preview" / "img0" / "overlay.png").is_file()


def test_predict_gives_original_pixel_coordinates(fitted, tmp_path):
    root, out, _ = fitted
    cfg = make_cfg(None, mode="predict", embeddings=str(out / "keypoints.safetensors"), image=str(root / "imgs" / "img1.png"),
                   augmentations=2)
    keypoints.run(cfg, tmp_path)
    rec = json.loads((tmp_path / "img1" / "keypoints.json").read_text())
    assert rec["size"] == {"width": 80, "height": 64} and len(rec["points"]) == 2
    # 80 x 64 image, centre crop: a 64 px square from x = 8, analysed at 64 px (the tiny model's size)
    for p, (px, py) in zip(rec["points"], rec["processed"]["points"]):
        assert p["x"] == pytest.approx(px + 8) and p["y"] == pytest.approx(py)
        assert 0 < p["confidence"] <= 1
    assert Image.open(tmp_path / "img1" / "overlay.png").size == (80, 64)
    keypoints.run(OmegaConf.merge(cfg, {"keypoints": {"predict": {"readout": "soft_argmax", "soft_radius": 3.0}}}),
                  tmp_path / "soft")
    soft = json.loads((tmp_path / "soft" / "img1" / "keypoints.json").read_text())
    for a, b in zip(rec["points"], soft["points"]):     # a centroid inside the window around the maximum
        assert np.hypot(a["x"] - b["x"], a["y"] - b["y"]) <= 3.0 and a["confidence"] == b["confidence"]


def make_cub_with_images(root: Path):
    from test_landmarks_cub_reader import make_cub

    base = make_cub(root)
    for rel in ("001.Albatross/a_1.jpg", "001.Albatross/a_2.jpg", "002.Auklet/b_1.jpg"):
        (base / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (400, 300), (90, 120, 150)).save(base / "images" / rel)
    return base


def cub_eval(out: Path, tmp_path: Path):
    """(the CUB root, its data config, an eval config of the fitted keypoints in `out` with one transform)."""
    base = make_cub_with_images(tmp_path / "cub")
    data = OmegaConf.merge(OmegaConf.load(CONF / "data" / "cub.yaml"), {"root": str(base), "train_split": "all"})
    return base, data, make_cfg(data, mode="eval", embeddings=str(out / "keypoints.safetensors"), augmentations=1)


def test_eval_on_cub_writes_metrics_and_resumes(fitted, tmp_path):
    cfg = cub_eval(fitted[1], tmp_path)[2]
    metrics = keypoints.run(cfg, tmp_path / "eval")
    assert metrics["num_train"] == 3 and metrics["num_test"] == 1 and np.isfinite(metrics["mean_l2"])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["mean_l2"] == metrics["mean_l2"]
    # the no-image baseline in the same run: every test image gets the training images' mean landmarks
    assert np.isfinite(metrics["baseline_mean_landmarks_mean_l2"])
    rows = json.loads((tmp_path / "eval" / "test_predictions.json").read_text())
    assert len(rows) == 1 and rows[0]["error"] == pytest.approx(metrics["mean_l2"])
    assert Image.open(tmp_path / "eval" / "test_predictions.png").size == (192, 192)


def test_eval_applies_an_earlier_regressor_to_a_new_test_set_without_reading_train(fitted, tmp_path):
    _, out, _ = fitted
    base, data, cfg = cub_eval(out, tmp_path)
    first = keypoints.run(cfg, tmp_path / "first")
    regressor = tmp_path / "first" / "regressor.safetensors"
    # the same test set through the saved regressor: the same numbers, and no train image read (its split is gone)
    for rel in ("001.Albatross/a_1.jpg", "002.Auklet/b_1.jpg"):
        (base / "images" / rel).unlink()
    again = keypoints.run(OmegaConf.merge(cfg, {"keypoints": {"eval": {"regressor": str(regressor)}}}),
                          tmp_path / "again")
    for key in ("mean_l2", "baseline_mean_landmarks_mean_l2"):
        assert again[key] == pytest.approx(first[key], rel=1e-12)
    assert again["num_train"] == 3 and again["regressor"] == str(regressor.resolve())
    assert not (tmp_path / "again" / "eval_train_state.json").exists()
    # a regressor fitted on other keypoints is refused in one line
    other = load_model(out / "keypoints.safetensors")
    other.indices = other.indices.flip(0)
    save_model(tmp_path / "other" / "keypoints", other)
    bad = make_cfg(data, mode="eval", embeddings=str(tmp_path / "other" / "keypoints.safetensors"), augmentations=1,
                   **{"eval.regressor": str(regressor)})
    with pytest.raises(DiffprobeError, match="fitted on other keypoints"):
        keypoints.run(bad, tmp_path / "bad")
    # one fitted on another dataset (3 landmarks; CUB has 15) is refused before any image is read
    from diffprobe.io import load_tensors, save_tensors

    tensors, meta = load_tensors(regressor)
    save_tensors(tmp_path / "three.safetensors", {"W": tensors["W"][:, :6], "mean_landmarks": torch.zeros(3, 2)},
                 metadata=meta)
    with pytest.raises(DiffprobeError, match="predicts 3 landmarks and this dataset has 15"):
        keypoints.run(OmegaConf.merge(cfg, {"keypoints": {"eval": {"regressor": str(tmp_path / "three.safetensors")}}}),
                      tmp_path / "three")
    assert not (tmp_path / "three" / "eval_test_state.json").exists()


def test_mean_landmarks_baseline_counts_only_visible_points():
    gt = np.array([[[0.2, 0.4], [0.9, 0.9]], [[0.4, 0.6], [0.1, 0.3]]])
    visible = np.array([[True, False], [True, True]])
    np.testing.assert_allclose(mean_landmarks(gt, visible), [[0.3, 0.5], [0.1, 0.3]])
    # on CUB's metric: the second test image's one visible point is 0.1 away from the mean
    test_gt = np.array([[[0.3, 0.5], [0.1, 0.3]], [[0.3, 0.6], [0.5, 0.5]]])
    test_vis = np.array([[True, True], [True, False]])
    res = landmark_metric("cub", np.broadcast_to(mean_landmarks(gt, visible), test_gt.shape), test_gt, test_vis)
    np.testing.assert_allclose(res["per_image"], [0.0, 0.1], atol=1e-12)


def test_eval_collection_resumes_from_its_checkpoint(tmp_path):
    paths = write_images(tmp_path / "imgs", 3, size=(32, 32))
    items = [LandmarkItem(p, keypoints=np.array([[4.0, 8.0]]) * (i + 1)) for i, p in enumerate(paths)]
    images = ImageSet(items, 16)
    calls = []

    def predict(image_set, i):
        calls.append(i)
        _, frame, size = image_set.load(i)
        return np.full((1, 2), float(i)), np.ones(1), frame, size

    found, gt, vis = collect(predict, images, "train", tmp_path, None)
    np.testing.assert_allclose(gt[:, 0], [[0.125, 0.25], [0.25, 0.5], [0.375, 0.75]])    # (4, 8) px of 32 -> /32
    np.testing.assert_allclose(found[:, 0, 0], [0, 1 / 16, 2 / 16])
    calls.clear()
    again = collect(predict, images, "train", tmp_path / "next", resume=str(tmp_path))
    assert calls == [] and np.array_equal(again[0], found)


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(DiffprobeError, match="mode"):
        keypoints.run(make_cfg(None, mode="train"), tmp_path)
    with pytest.raises(DiffprobeError, match="embeddings"):
        keypoints.run(make_cfg(None, mode="predict"), tmp_path)
    with pytest.raises(DiffprobeError, match="data"):
        keypoints.run(make_cfg(None, **SMALL), tmp_path)
    with pytest.raises(DiffprobeError, match="top_k <= candidates"):
        keypoints.run(make_cfg({"name": "folder", "root": str(tmp_path)}, top_k=30), tmp_path)


def test_cli_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffprobe", "task=keypoints", "mode=predict",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2
    assert "needs embeddings=PATH" in proc.stderr and "Traceback" not in proc.stderr


def test_celeba_follows_the_reference_protocol(tmp_path):
    # data=celeba: fit and vote on MAFL training.txt (not every non-test image), faces squashed to the square
    from diffprobe.data.world import render_scene, scene_seed
    from diffprobe.data.world.export import write_celeba

    faces = [render_scene(scene_seed("train", i), first="face", max_objects=1) for i in range(5)]
    root = write_celeba(tmp_path / "celeba", faces[:3], faces[3:])
    (root / "MAFL" / "training.txt").write_text("000001.jpg\n000002.jpg\n")  # 000003 is in neither MAFL list
    data = OmegaConf.merge(OmegaConf.load(CONF / "data" / "celeba.yaml"), {"root": str(root)})
    keypoints.run(make_cfg(data, **SMALL), tmp_path / "fit")
    config = load_model(tmp_path / "fit" / "keypoints.safetensors").config
    assert config["num_images"] == 2 and config["crop"] == "none" and config["resize"] == "bilinear"
    # squashed: landmark x is divided by the width and y by the height
    item = LandmarkItem(write_images(tmp_path / "wide", 1, size=(80, 64))[0], keypoints=np.array([[40.0, 16.0]]))
    images = ImageSet([item], 32, crop="none")
    gt, _ = images.landmarks(0, images.load(0)[1])
    np.testing.assert_allclose(gt, [[0.5, 0.25]])


def test_damaged_keypoints_files_are_named_precisely(tmp_path):
    import shutil

    import torch

    from diffprobe.heads.keypoints.state import KeypointModel, save_model
    from diffprobe.io import save_tensors

    good = save_model(tmp_path / "kp", KeypointModel(torch.zeros(5, 4), torch.tensor([1, 3]), {"maps": {}}))
    floats = tmp_path / "floats"
    floats.mkdir()
    save_tensors(floats / "kp.safetensors", {"embeddings": torch.zeros(5, 4), "indices": torch.tensor([1.0, 3.0])},
                 metadata={"format": "diffprobe.keypoints/1"})
    shutil.copy(good.with_suffix(".json"), floats / "kp.json")
    with pytest.raises(DiffprobeError, match="indices must be integers, got torch.float32"):
        load_model(floats / "kp.safetensors")
    far = tmp_path / "far"
    far.mkdir()
    save_model(far / "kp", KeypointModel(torch.zeros(5, 4), torch.tensor([1, 3]), {"maps": {}}))
    tensors = {"embeddings": torch.zeros(5, 4), "indices": torch.tensor([1, 9])}
    save_tensors(far / "kp.safetensors", tensors, metadata={"format": "diffprobe.keypoints/1"})
    with pytest.raises(DiffprobeError, match="index 9 is outside the 5 embeddings"):
        load_model(far / "kp.safetensors")
    good.with_suffix(".json").unlink()
    with pytest.raises(DiffprobeError, match="kp.json is missing"):
        load_model(good)


def test_sites_default_to_the_models_then_the_rule():
    from diffprobe.loading import tiny_backbone
    from diffprobe.tasks.keypoints import _context, settings_of

    bb = tiny_backbone("sd15")
    rule = _context(make_cfg(), settings_of(make_cfg()), bb, None).spec.sites
    assert rule == tuple(f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2.hook_probs" for i in range(3)) + (
        "up_blocks.2.attentions.0.transformer_blocks.0.attn2.hook_probs",)  # the reference's layers on SD 1.5
    model = OmegaConf.merge(OmegaConf.load(CONF / "model" / "tiny_sd15.yaml"),
                            {"keypoints_sites": ["up_blocks.3.*.attn2.hook_probs"]})
    cfg = make_cfg(model=model)
    chosen = _context(cfg, settings_of(cfg), bb, None).spec.sites
    assert chosen == tuple(f"up_blocks.3.attentions.{i}.transformer_blocks.0.attn2.hook_probs" for i in range(3))
    cfg = make_cfg(model=model, sites=["up_blocks.1.attentions.0.*.attn2.hook_probs"])  # the task's key wins
    given = _context(cfg, settings_of(cfg), bb, None).spec.sites
    assert given == ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.hook_probs",)


def test_data_defaults_live_in_the_shipped_config_only():
    from diffprobe.tasks.keypoints_data import with_defaults

    cub = with_defaults({"name": "cub", "root": "somewhere"})
    assert cub["box_margin"] == 0.05 and cub["crop_to_box"] is True and cub["root"] == "somewhere"  # conf/data/cub.yaml
    assert with_defaults({"name": "cub", "box_margin": 0.2, "classes": None})["box_margin"] == 0.2
    assert with_defaults({"name": "celeba"})["variant"] == "aligned"


def test_the_keypoint_keys_are_the_heads_settings_written_once():
    from dataclasses import asdict, fields

    from diffprobe.heads.keypoints.affine import AffineRange
    from diffprobe.training.keypoints import FitSettings
    from diffprobe.heads.keypoints.predict import PredictSettings
    from diffprobe.tasks.keypoints import AFFINE_KEYS, FIT_KEYS, PREDICT_KEYS

    for keys, head in ((FIT_KEYS, FitSettings), (PREDICT_KEYS, PredictSettings), (AFFINE_KEYS, AffineRange)):
        wanted = {k: v for k, v in asdict(head()).items() if k not in ("affine", "seed")}
        assert asdict(keys()) == wanted and [f.name for f in fields(keys)] == list(wanted)
