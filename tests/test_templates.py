"""Pose templates on planted keypoint sets with known answers, the seed-003 metrics, and bad inputs."""

import numpy as np
import pytest

from diffprobe.errors import DiffprobeError
from diffprobe.eval.clustering import adjusted_rand_index, purity
from diffprobe.eval.landmarks import mse_height_normalised
from diffprobe.eval.pck import pck, threshold_box_diagonal
from diffprobe.heads.templates import fit_templates, fit_to_templates, normalise

TRUE = np.array([  # three 5-point poses in the unit box
    [[-0.5, -0.5], [0.5, -0.5], [0.0, 0.0], [-0.3, 0.5], [0.3, 0.5]],
    [[-0.5, 0.5], [0.5, 0.5], [0.0, 0.0], [-0.3, -0.5], [0.3, -0.5]],
    [[-0.5, 0.0], [0.5, 0.0], [0.0, -0.5], [0.0, 0.5], [0.2, 0.2]],
])


def planted(n_per: int = 40, seed: int = 0, hide: float = 0.1):
    """Sets drawn around the true templates: per-axis scale and offset, small jitter, some points hidden."""
    rng = np.random.default_rng(seed)
    sets, labels = [], []
    for t, template in enumerate(TRUE):
        for _ in range(n_per):
            scale = rng.uniform(20, 80, 2)
            offset = rng.uniform(0, 200, 2)
            sets.append(template * scale + offset + rng.normal(0, 0.02, (5, 2)) * scale)
            labels.append(t)
    sets = np.array(sets)
    visible = rng.random(sets.shape[:2]) > hide
    visible[:, :3] = True  # keep each set's box defined
    return sets, visible, np.array(labels)


def test_templates_are_recovered_from_planted_sets():
    sets, visible, labels = planted()
    norm = normalise(sets, visible)
    assert np.all(np.abs(norm.points[norm.visible]) <= 0.5 + 1e-9)
    t = fit_templates(norm, k=3, seed=0)
    for true in TRUE:  # every true template has a learned one within 0.08 (up to order; jitter moves the box)
        assert min(np.abs(learned - true).max() for learned in t.points) < 0.08
    # a hidden point can shrink a set's box (the box is that of its visible points): a set or two may stray
    assert purity(labels, t.assignment) >= 0.97 and adjusted_rand_index(labels, t.assignment) >= 0.95
    full = fit_templates(normalise(sets), k=3, seed=0)  # every point visible: the exact partition
    assert purity(labels, full.assignment) == 1.0 and adjusted_rand_index(labels, full.assignment) == pytest.approx(1.0)
    np.testing.assert_allclose(sorted(full.frequency), [1 / 3] * 3)
    np.testing.assert_allclose(norm.to_original(norm.points)[norm.visible], sets[norm.visible])


def test_fitting_flags_a_planted_outlier_and_fills_missing_points():
    sets, visible, _ = planted(n_per=5, hide=0.0)
    t = fit_templates(normalise(sets, visible), k=3)
    probe = sets[:2].copy()
    probe[0, 4] += np.array([60.0, -45.0])      # a mislocalised point
    vis = np.ones((2, 5), bool)
    vis[1, 3] = False                           # a missing point
    fit = fit_to_templates(t.points, probe, vis)
    assert fit.outlier[0].tolist() == [False, False, False, False, True]
    assert not fit.outlier[1].any() and np.isnan(fit.residual[1, 3])
    assert np.abs(fit.filled[0, 4] - sets[0, 4]).max() < 5.0    # the outlier replaced by the template's point
    assert np.abs(fit.filled[1, 3] - sets[1, 3]).max() < 5.0    # the missing point filled in
    assert fit.template[0] == t.assignment[0]


def test_bad_keypoint_sets_are_one_line_errors():
    sets, visible, _ = planted(n_per=2)
    with pytest.raises(DiffprobeError, match="non-empty"):
        normalise(np.zeros((0, 5, 2)))
    with pytest.raises(DiffprobeError, match="invisible"):
        normalise(sets, np.zeros(visible.shape, bool))
    with pytest.raises(DiffprobeError, match="cannot make 10 templates from 6"):
        fit_templates(normalise(sets, visible), k=10)
    t = fit_templates(normalise(sets, visible), k=2)
    with pytest.raises(DiffprobeError, match="templates have 5 keypoints, the sets 4"):
        fit_to_templates(t.points, sets[:, :4])
    with pytest.raises(DiffprobeError, match="visibility must be"):
        normalise(sets, visible[:, :3])


def test_seed_003_metrics_on_hand_computed_cases():
    gt = np.array([[[0.0, 0.0], [10.0, 0.0]]])
    pred = gt + np.array([[[3.0, 4.0], [0.0, 0.0]]])
    # PCK@0.2 of the box diagonal: box 10 x 20 -> diagonal 22.36, radius 4.47; the first point is 5 px off
    res = pck(pred, gt, threshold_box_diagonal([0, 0, 10, 20], 0.2))
    assert res.name == "0.2_boxdiag" and res.per_point == pytest.approx(0.5)
    # MSE of coordinates normalised by the image height 100: (0.03^2 + 0.04^2 + 0) / 2 points
    assert mse_height_normalised(pred, gt, 100)["mse_height_normalised"] == pytest.approx(0.0025 / 2)
    assert purity([0, 0, 1, 1], [5, 5, 5, 7]) == pytest.approx(0.75)
    assert adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert adjusted_rand_index([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(-0.5)


def test_templates_task_writes_its_files_and_scores_world_poses(tmp_path):
    import json

    from config_helpers import make_cfg

    from diffprobe.io import load_tensors
    from diffprobe.tasks import templates

    metrics = templates.run(make_cfg("templates", n=120, k=6, category="bird"), tmp_path / "a")
    for name in ("templates.safetensors", "templates.json", "templates.png", "assignments.json", "metrics.json"):
        assert (tmp_path / "a" / name).is_file(), name
    tensors, meta = load_tensors(tmp_path / "a" / "templates.safetensors")
    assert tensors["templates"].shape == (6, 15, 2) and len(json.loads(meta["keypoints"])) == 15
    # birds facing left or right, turned three ways: the templates separate them well beyond chance
    assert metrics["pose_classes"] == 6 and metrics["purity"] > 0.75 and metrics["adjusted_rand_index"] > 0.5
    assert metrics["pck@0.2_boxdiag_per_point"] > 0.9
    rows = json.loads((tmp_path / "a" / "assignments.json").read_text())
    assert len(rows) == 120 and {r["template"] for r in rows} <= set(range(6))
    # the saved templates fit new sets
    again = templates.run(make_cfg("templates", n=30, k=6, category="bird", split="test",
                                   fit_to=str(tmp_path / "a" / "templates.safetensors")), tmp_path / "b")
    assert again["sets"] == 30 and again["templates"] == 6
    with pytest.raises(DiffprobeError, match="cannot make 14 templates from 5"):
        templates.run(make_cfg("templates", n=5, k=14), tmp_path / "c")
    with pytest.raises(DiffprobeError, match="templates have 15 keypoints, the sets 5"):
        templates.run(make_cfg("templates", n=10, category="face",
                               fit_to=str(tmp_path / "a" / "templates.safetensors")), tmp_path / "d")
    with pytest.raises(DiffprobeError, match="mode=predict run"):
        templates.run(make_cfg("templates", source="predictions", predictions=str(tmp_path)), tmp_path / "e")
