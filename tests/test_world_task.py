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
