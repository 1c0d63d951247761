"""The hostile user's table (issue 30): each case that crashed, lost work or said nothing now ends in one line, a
warning, or the right output."""

import json
import logging
from pathlib import Path

import pytest
from cli_helpers import cli, one_line_error
from config_helpers import make_cfg
from PIL import Image

from diffprobe.errors import DiffprobeError


def _predictions(root: Path, points, summary=None, dirs_absolute=False) -> Path:
    """A keypoints mode=predict run folder with two images holding `points` (as written in keypoints.json)."""
    images = {}
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "keypoints.json").write_text(json.dumps({"points": points, "size": {"width": 64,
                                                                                             "height": 48}}))
        images[f"in/{name}.png"] = {"dir": str(root / name) if dirs_absolute else name, "points": points}
    (root / "summary.json").write_text(json.dumps(summary if summary is not None else
                                                  {"task": "keypoints", "images": images, "skipped": {}}))
    return root


def _templates(folder: Path, out: Path):
    from diffprobe.tasks import templates

    return templates.run(make_cfg("templates", source="predictions", predictions=str(folder), k=1), out)


def test_templates_reads_points_as_lists_or_records_and_from_a_moved_run(tmp_path):
    records = [{"id": i, "x": 10.0 + 5 * i, "y": 20.0 - 3 * i, "confidence": 0.5} for i in range(4)]
    metrics = _templates(_predictions(tmp_path / "p1", records), tmp_path / "o1")
    assert metrics["sets"] == 2
    lists = [[10.0 + 5 * i, 20.0 - 3 * i] for i in range(4)]
    assert _templates(_predictions(tmp_path / "p2", lists), tmp_path / "o2")["sets"] == 2
    _predictions(tmp_path / "p3", lists, dirs_absolute=True)  # an earlier release's absolute folders ...
    (tmp_path / "p3").rename(tmp_path / "moved")  # ... of a run folder that was moved since
    assert _templates(tmp_path / "moved", tmp_path / "o3")["sets"] == 2


@pytest.mark.parametrize("make,expected", [
    (lambda d: _predictions(d, [[1.0, 2.0]], summary={"images": {}}), "lists no images"),
    (lambda d: (d.mkdir(), (d / "summary.json").write_text("{not json")), "not readable JSON"),
    (lambda d: _predictions(d, [[1.0, float("nan")], [3.0, 4.0]]), "not finite"),
    (lambda d: _predictions(d, [[1.0]]), "does not hold keypoints"),
    (lambda d: _predictions(d, [[1.0, 2.0]], summary={"task": "diffseg", "images": {"x.png": {"dir": "a"}}}),
     "not the summary of a task=keypoints"),
])
def test_bad_prediction_folders_are_one_line_and_write_nothing(tmp_path, make, expected):
    folder = tmp_path / "pred"
    make(folder)
    with pytest.raises(DiffprobeError, match=expected):
        _templates(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_diffseg_run_folder_is_not_keypoints(tmp_path):
    Image.new("RGB", (64, 64), (40, 90, 200)).save(tmp_path / "a.png")
    res = cli("task=diffseg", "model=tiny_sd15", f"image={tmp_path / 'a.png'}", f"hydra.run.dir={tmp_path / 'seg'}",
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    with pytest.raises(DiffprobeError, match="not the summary of a task=keypoints"):
        _templates(tmp_path / "seg", tmp_path / "out")


@pytest.mark.parametrize("points,expected", [("[[1000,1000]]", "1 of the 1 points lie outside the 64 x 48 image"),
                                             ("[]", "points is empty: there is nothing to match"),
                                             ("[[-1,5],[3,4]]", "1 of the 2 points lie outside")])
def test_correspond_points_outside_the_image_or_none_are_one_line(tmp_path, points, expected):
    Image.new("RGB", (64, 48), (40, 90, 200)).save(tmp_path / "a.png")
    res = cli("task=correspond", "model=tiny_sd15", f"source={tmp_path / 'a.png'}", f"target={tmp_path / 'a.png'}",
              f"points={points}", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    one_line_error(res, expected)


def test_hints_name_the_tasks_own_keys_and_only_close_matches():
    from diffprobe.cli import config_error

    keys = ["diffseg.tau", "diffseg.timestep", "diffseg.ncut_tau", "task", "seed", "image"]
    assert "did you mean diffseg.tau?" in config_error("Could not override 'taus'", keys, "diffseg")
    assert "did you mean seed?" in config_error("Could not override 'sed'", keys, "diffseg")
    assert "did you mean" not in config_error("Could not override 'zzz'", keys, "diffseg")
    line = config_error("Could not find 'model/sd16'", [], "diffseg")
    assert "did you mean model=sd14 or model=sd15?" in line


def test_a_model_config_sets_its_own_task_defaults_and_the_command_line_wins(tmp_path):
    def shown(*args):
        res = cli("task=keypoints", *args, "--cfg", "job", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        return res.stdout

    mini, tiny, mine = shown(), shown("model=tiny_sd15"), shown("upsample_queries=64")
    assert "upsample_queries: 32" in mini and "sigma: 1.0" in mini
    assert "upsample_queries: 128" in tiny and "sigma: 2.0" in tiny
    assert "upsample_queries: 64" in mine and "sigma: 1.0" in mine


def test_a_prompt_longer_than_the_model_reads_is_warned_about(caplog):
    from diffprobe.loading import load_backbone
    from diffprobe.drives import encode_prompt

    bb = load_backbone({"name": "tiny_sd15", "tiny": "sd15"})
    with caplog.at_level(logging.WARNING):
        encode_prompt(bb, [" ".join(["a red house"] * 200)])
    assert f"reads {bb.max_tokens}: everything after" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        encode_prompt(bb, ["a red house"])
    assert "everything after" not in caplog.text


def test_image_size_zero_is_refused_not_taken_as_the_default(tmp_path):
    Image.new("RGB", (64, 64), (40, 90, 200)).save(tmp_path / "a.png")
    res = cli("task=diffseg", "model=tiny_sd15", f"image={tmp_path / 'a.png'}", "image_size=0",
              f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    one_line_error(res, "diffseg.image_size must be in 8..16384, not 0")


def test_nan_embeddings_are_refused(tmp_path):
    import torch

    from diffprobe.heads.keypoints.state import KeypointModel, load_model, save_model

    emb = torch.randn(6, 8)
    emb[2, 3] = float("nan")
    path = save_model(tmp_path / "keypoints", KeypointModel(emb, torch.tensor([0, 1]), {}, [1, 1]))
    with pytest.raises(DiffprobeError, match="NaN or infinite"):
        load_model(path)


def test_the_readme_world_to_diffseg_eval_pair_works(tmp_path):
    res = cli("task=world", "world.format=coco_stuff", "world.n=3", f"world.out={tmp_path / 'world_coco'}",
              f"hydra.run.dir={tmp_path / 'w'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = cli("task=diffseg_eval", "model=tiny_sd15", "data=coco_stuff27", f"data.root={tmp_path / 'world_coco'}",
              "diffseg.anchors=8", f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["results"]


def test_help_points_to_documentation_that_exists(tmp_path):
    res = cli("--help", cwd=tmp_path)
    line = next(x for x in res.stdout.splitlines() if x.startswith("Documentation: "))
    folder = Path(line.split()[1])
    assert (folder / "outputs.md").is_file() and (folder / "diffseg.md").is_file() and (folder / "img").is_dir()


def test_the_keypoint_fit_hint_fits_the_model():
    from types import SimpleNamespace

    from diffprobe.training.keypoints import cpu_hint

    assert "image_size=256" in cpu_hint(SimpleNamespace(sample_size=512))
    assert "image_size=256" not in cpu_hint(SimpleNamespace(sample_size=64))
