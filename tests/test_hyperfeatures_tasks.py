"""task=hyperfeatures (train -> eval -> ablate -> extract) and task=correspond end to end on a tiny model."""

import json
from pathlib import Path

import pytest
from hyperfeatures_fixtures import cub_tree, planted_pairs, spair_tree  # noqa: F401 (fixture)
from omegaconf import OmegaConf

from diffprobe.errors import DiffprobeError
from diffprobe.io import load_tensors

CONF = Path(__file__).resolve().parent.parent / "conf"


def compose(task: str, data: str | None = None, **overrides):
    from config_helpers import make_cfg

    return make_cfg(task, data=OmegaConf.load(CONF / "data" / f"{data}.yaml") if data else None, **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from diffprobe.tasks import hyperfeatures

    root = tmp_path_factory.mktemp("pairs")
    pairs = planted_pairs(root)
    rows = [{"source_path": p.source.name, "target_path": p.target.name, "source_points": p.source_points.tolist(),
             "target_points": p.target_points.tolist(), "target_bounding_box": p.target_bbox.tolist()} for p in pairs]
    (root / "pairs.json").write_text(json.dumps(rows))
    out = tmp_path_factory.mktemp("train")
    cfg = compose("hyperfeatures", "pairs", **{"data.file": str(root / "pairs.json"), "num_steps": 2, "save_every": 1,
                                               "output_size": 16, "projection_dim": 32, "train_steps": 16, "val_every": 8})
    metrics = hyperfeatures.run(cfg, out)
    return root, out, metrics


def test_train_writes_model_curves_mixing_weights_and_metrics(trained):
    root, out, metrics = trained
    for name in ("model/aggregator.safetensors", "model/aggregator.json", "model/extraction.json",
                 "checkpoint/checkpoint.safetensors", "curves.png", "mixing_weights.png", "history.json", "metrics.json"):
        assert (out / name).is_file(), name
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 16 and [r[0] for r in history["val"]] == [8, 16]
    mix = json.loads((out / "mixing_weights.json").read_text())
    assert len(mix["weights"]) == 12 and len(mix["weights"][0]) == 2
    assert abs(sum(map(sum, mix["weights"])) - 1) < 1e-5
    assert metrics["val"]["pck@0.1_img_per_point"] == history["val"][-1][1]
    assert metrics["unet_extractions"] == 6


def test_the_metrics_are_the_trainings_last_validation_not_a_second_pass(trained, tmp_path, monkeypatch):
    """mode=train validates after its last step (with the task's matching method) and reports that validation: the
    pairs are matched once at the end, not twice; a rerun of the finished training validates afresh."""
    from diffprobe.tasks import hyperfeatures
    from diffprobe.training import hyperfeatures as training

    root, _, _ = trained
    passes = []
    evaluate = training.evaluate_pairs
    counted = lambda *a, **kw: passes.append(1) or evaluate(*a, **kw)  # noqa: E731
    monkeypatch.setattr(training, "evaluate_pairs", counted)
    monkeypatch.setattr(hyperfeatures, "evaluate_pairs", counted)
    overrides = {"data.file": str(root / "pairs.json"), "num_steps": 2, "save_every": 1, "output_size": 16,
                 "projection_dim": 32, "train_steps": 2, "val_every": 2, "method": "mutual"}
    metrics = hyperfeatures.run(compose("hyperfeatures", "pairs", **overrides), tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(passes) == 1
    assert metrics["val"]["method"] == "mutual" and history["last_val"] == {"step": 2, "summary": metrics["val"]}
    # a rerun of the finished training in its folder trains no step: it validates again, by the method given now
    again = hyperfeatures.run(compose("hyperfeatures", "pairs", **{**overrides, "method": "nn"}), tmp_path)
    assert len(passes) == 2 and again["val"]["method"] == "nn"


def test_eval_reproduces_training_validation_and_ablate_reports_pruned(trained, tmp_path):
    from diffprobe.tasks import hyperfeatures

    root, out, metrics = trained
    common = {"weights": str(out / "model"), "data.file": str(root / "pairs.json")}
    ev = hyperfeatures.run(compose("hyperfeatures", "pairs", mode="eval", **common), tmp_path / "eval")
    assert ev["hyperfeatures"]["pck@0.1_img_per_point"] == pytest.approx(metrics["val"]["pck@0.1_img_per_point"])
    assert "pck@0.1_bbox_per_point" in ev["hyperfeatures"]
    assert len(list((tmp_path / "eval" / "pairs").glob("hyperfeatures_*.png"))) == 3  # plot_pairs=4 > 3 pairs
    ab = hyperfeatures.run(compose("hyperfeatures", "pairs", mode="ablate", **common), tmp_path / "ablate")
    assert {"hyperfeatures", "pruned_raw", "pruned_bottleneck"} <= set(ab)
    mix = json.loads((out / "mixing_weights.json").read_text())
    assert ab["pruned"]["layer"] == mix["top"]["layer"]
    assert (tmp_path / "ablate" / "ablation.json").is_file()


def test_baseline_scores_one_raw_layer_without_weights(trained, tmp_path):
    from diffprobe.tasks import hyperfeatures

    root, _, _ = trained
    res = hyperfeatures.run(compose("hyperfeatures", "pairs", mode="baseline", **{"data.file": str(root / "pairs.json")}),
                            tmp_path)
    assert res["layer"] == "up_blocks.1.resnets.0.hook_residual"
    assert 0 <= res["raw_layer"]["pck@0.1_img_per_point"] <= 1 and res["raw_layer"]["num_points_img"] == 18
    assert json.loads((tmp_path / "metrics.json").read_text())["raw_layer"] == res["raw_layer"]


def test_spair_and_cub_data_say_which_pairs_were_used(trained, tmp_path):
    from diffprobe.tasks import hyperfeatures

    spair_tree(tmp_path / "SPair-71k", per_cat=3, cats=("cat", "dog"))
    res = hyperfeatures.run(compose("hyperfeatures", "spair", mode="baseline", **{"data.root": str(tmp_path),
                                                                                  "data.per_category": 2}), tmp_path / "a")
    assert res["pairs"] == "SPair-71k test: a seeded subset of 2 pairs per category (seed 0), 4 pairs"
    assert res["raw_layer"]["num_points_img"] == res["raw_layer"]["num_points_bbox"] == 8
    cub_tree(tmp_path / "CUB_200_2011")
    res = hyperfeatures.run(compose("hyperfeatures", "cub", mode="baseline", **{"data.root": str(tmp_path)}), tmp_path / "b")
    assert res["pairs"].startswith("CUB-200-2011 test: 5 same-class pairs per class") and res["raw_layer"]["num_pairs"] == 3


def test_extract_writes_descriptors(trained, tmp_path):
    from diffprobe.tasks import hyperfeatures

    root, out, _ = trained
    hyperfeatures.run(compose("hyperfeatures", mode="extract", weights=str(out / "model"), image=str(root / "s0.png")),
                      tmp_path)
    tensors, meta = load_tensors(tmp_path / "s0" / "descriptors.safetensors")
    assert tensors["descriptors"].shape == (32, 16, 16) and meta["height"] == "64"
    assert (tmp_path / "s0" / "pca.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["images"][str(root / "s0.png")]["dir"] == "s0"


def test_correspond_with_weights_and_ground_truth(trained, tmp_path):
    from diffprobe.tasks import correspond

    root, out, _ = trained
    cfg = compose("correspond", source=str(root / "s0.png"), target=str(root / "t0.png"), weights=str(out / "model"),
                  points=[[10, 20], [30, 40]], target_points=[[18, 28], [38, 48]])
    res = correspond.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "matches.json").read_text())
    assert len(saved["target_points"]) == 2 and saved["descriptor"] == "hyperfeatures"
    assert saved["pck@0.1_img"] == res["pck@0.1_img"] == sum(saved["correct"]) / 2
    assert (tmp_path / "correspondences.png").is_file()


def test_correspond_without_points_or_weights_uses_salient_grid_and_raw_layer(trained, tmp_path):
    from diffprobe.tasks import correspond

    root, _, _ = trained
    res = correspond.run(compose("correspond", source=str(root / "s1.png"), target=str(root / "t1.png"), grid=4,
                                 method="soft_argmax"), tmp_path)
    assert res["descriptor"].startswith("raw layer") and 1 <= len(res["source_points"]) <= 16
    assert len(res["target_points"]) == len(res["source_points"])


def test_correspond_generates_a_pair_from_prompts(trained, tmp_path):
    from diffprobe.tasks import correspond

    _, out, _ = trained
    res = correspond.run(compose("correspond", source_prompt="a cat", target_prompt="a dog", weights=str(out / "model"),
                                 grid=3), tmp_path / "a")
    assert res["descriptor"] == "hyperfeatures, generation steps flipped" and res["source"] == "source.png"
    for name in ("source.png", "target.png", "matches.json", "correspondences.png"):
        assert (tmp_path / "a" / name).is_file()
    raw = correspond.run(compose("correspond", source_prompt="a cat", target_prompt="a dog", num_steps=2,
                                 points=[[5, 5]]), tmp_path / "b")
    assert raw["descriptor"].startswith("raw layer") and len(raw["target_points"]) == 1
    with pytest.raises(DiffprobeError, match="not both"):
        correspond.run(compose("correspond", source_prompt="a", target_prompt="b", source="x.png", target="y.png"),
                       tmp_path)


def test_bad_settings_are_one_line_errors(trained, tmp_path):
    from diffprobe.tasks import correspond, hyperfeatures

    root, out, _ = trained
    with pytest.raises(DiffprobeError, match="mode"):
        hyperfeatures.run(compose("hyperfeatures", mode="fly"), tmp_path)
    with pytest.raises(DiffprobeError, match="weights"):
        hyperfeatures.run(compose("hyperfeatures", mode="eval"), tmp_path)
    with pytest.raises(DiffprobeError, match="needs pairs"):
        hyperfeatures.run(compose("hyperfeatures"), tmp_path)
    with pytest.raises(DiffprobeError, match="source"):
        correspond.run(compose("correspond", target=str(root / "t0.png")), tmp_path)
    with pytest.raises(DiffprobeError, match="points"):
        correspond.run(compose("correspond", source=str(root / "s0.png"), target=str(root / "t0.png"),
                               points="[[1, 2]", weights=str(out / "model")), tmp_path)


def test_correspond_with_dift_features(tmp_path):
    """dift=true on tiny SD 2.1: both files described by DIFT (named with its site and ensemble in matches.json),
    every point matched; on tiny PixArt by DiTF; dift with weights is refused in one line."""
    import numpy as np
    from PIL import Image

    from config_helpers import make_cfg
    from diffprobe.tasks import correspond

    rng = np.random.default_rng(0)
    big = (rng.random((16, 16, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    Image.fromarray(big[:, :96]).save(tmp_path / "a.png")
    Image.fromarray(big[:, 8:104]).save(tmp_path / "b.png")
    cfg = make_cfg("correspond", model="tiny_sd21", source=str(tmp_path / "a.png"), target=str(tmp_path / "b.png"),
                   dift=True, dift_ensemble=2, image_size=64, points=[[40, 40], [60, 70]])
    res = correspond.run(cfg, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "matches.json").read_text())
    assert saved["descriptor"] == "DIFT" and saved["sites"] == ["up_blocks.1.hook_out"] and saved["ensemble"] == 2
    assert saved["timestep"] == 261 and len(res["target_points"]) == 2
    cfg = make_cfg("correspond", model="tiny_pixart", source=str(tmp_path / "a.png"), target=str(tmp_path / "b.png"),
                   dift=True, dift_ensemble=2, image_size=64, points=[[40, 40], [60, 70]])
    res = correspond.run(cfg, tmp_path / "dit")
    saved = json.loads((tmp_path / "dit" / "matches.json").read_text())   # a transformer: DiTF, its middle block
    assert saved["descriptor"] == "DiTF" and saved["timestep"] == 260 and saved["discard"] == "auto"
    assert saved["sites"] == ["transformer_blocks.0.hook_out", "transformer_blocks.1.hook_modulation"]
    assert len(res["target_points"]) == 2
    with pytest.raises(DiffprobeError, match="dift=true"):
        correspond.settings_of(make_cfg("correspond", source="a", target="b", dift=True, weights="w"))
