"""task=world writes the requested layout and refuses bad settings in one line."""

import json

import pytest
from omegaconf import OmegaConf

from diffprobe.data.spair import read_spair
from diffprobe.errors import DiffprobeError
from diffprobe.tasks.world import run


def test_images_and_spair_formats(tmp_path):
    res = run(OmegaConf.create({"seed": 0, "world": {"format": "images", "n": 2}}), tmp_path)
    truth = json.loads((tmp_path / "images" / "world.json").read_text())
    assert sorted(truth) == ["test_00000.png", "test_00001.png"] and res["format"] == "images"
    assert (tmp_path / "images" / "test_00001.png").is_file()
    run(OmegaConf.create({"world": {"format": "spair", "n": 1, "out": str(tmp_path / "sp")}}), tmp_path)
    assert sorted(p.category for p in read_spair(tmp_path / "sp", split="test")) == ["bird", "face", "house"]


def test_bad_format_is_a_one_line_error(tmp_path):
    with pytest.raises(DiffprobeError, match="world.format"):
        run(OmegaConf.create({"world": {"format": "voc"}}), tmp_path)


def test_celeba_and_cub_are_written_as_closeups_that_the_readers_load(tmp_path):
    from diffprobe.data.celeba import CelebaDataset
    from diffprobe.data.cub import CubDataset

    res = run(OmegaConf.create({"world": {"format": "celeba", "n": 3, "n_train": 2, "out": str(tmp_path / "c")}}),
              tmp_path)
    assert res["closeup"] is True
    faces = CelebaDataset(tmp_path / "c", "mafl_test")
    assert len(faces) == 3
    eyes = [abs(r.landmarks[1, 0] - r.landmarks[0, 0]) for r in faces]
    assert sum(eyes) / len(eyes) > 9  # close-up faces at 64 px: eyes about 13 px apart (about 6 in ordinary scenes)
    run(OmegaConf.create({"world": {"format": "cub", "n": 2, "n_train": 2, "out": str(tmp_path / "b")}}), tmp_path)
    birds = CubDataset(tmp_path / "b", "test")
    assert len(birds) == 2 and all((r.bbox[2] >= 30 or r.bbox[3] >= 30) for r in birds)  # width, height
    with pytest.raises(DiffprobeError, match="celeba and cub"):
        run(OmegaConf.create({"world": {"format": "images", "n": 1, "closeup": True}}), tmp_path)
