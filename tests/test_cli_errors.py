"""What a newcomer met: each mistake ends in one line and exit code 2, and nothing already done is lost."""

import json

import numpy as np
import pytest
from cli_helpers import cli, one_line_error
from PIL import Image


@pytest.mark.parametrize("args,expected", [
    (["timestep=5000", "noise=true"], "timestep must be in 0..999"),
    (["timestep=-3"], "timestep must be in 0..999"),
    (["add_noise=true"], "add_noise is now probe.noise"),
    (["return_freed_memory=maybe"], "bad run setting return_freed_memory: Value 'maybe' is not a valid bool"),
])
def test_bad_timesteps_and_renamed_keys(tmp_path, args, expected):
    Image.new("RGB", (64, 64), (40, 90, 200)).save(tmp_path / "a.png")
    res = cli("task=probe", "model=tiny_sd15", f"image={tmp_path / 'a.png'}", *args, f"hydra.run.dir={tmp_path / 'r'}",
              cwd=tmp_path)
    one_line_error(res, expected)


def test_a_run_that_cannot_fit_is_refused_before_it_starts(tmp_path):
    Image.new("RGB", (64, 64), (40, 90, 200)).save(tmp_path / "a.png")
    res = cli("task=diffseg", "model=tiny_sd15", f"image={tmp_path / 'a.png'}", "image_size=2048",
              f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    one_line_error(res, "GiB but")
    assert "lower image_size" in res.stderr


def test_an_unreadable_image_is_skipped_and_listed(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "r"
    res = cli("task=diffseg", "model=tiny_sd15", f"image={folder}", "tau=0.05", f"hydra.run.dir={out}", cwd=tmp_path)
    one_line_error(res, "1 of 2 images failed and were skipped")
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["skipped"]) == [str(folder / "broken.png")]
    assert list(summary["images"]) == [str(folder / "good.png")] and (out / "good" / "labels.png").is_file()
    assert summary["images"][str(folder / "good.png")]["dir"] == "good" and (summary["done"], summary["total"]) == (1, 2)


def test_silent_surprises_are_warned_about(tmp_path, caplog):
    from diffprobe.loading import load_backbone
    from diffprobe.data.images import load_image
    from diffprobe.drives import encode_prompt, unknown_words
    from diffprobe.heads.call import model_input
    from diffprobe.mini import packaged_path

    mini = load_backbone({"name": "mini", "path": str(packaged_path())})
    assert unknown_words(mini.tokenizer, "a red cat on grass") == ["cat"]  # mini knows world words only
    assert unknown_words(mini.tokenizer, "a red face on grass") == []
    encode_prompt(mini, ["a red cat on grass"])
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    load_image(tmp_path / "dot.png")
    model_input(Image.new("RGB", (300, 60)), 64, "center", "bicubic")
    text = caplog.text
    assert "'cat' are not in this model's vocabulary" in text and "only 1 x 1 px" in text
    assert "only its centre square (20 % of it)" in text


def test_an_unknown_word_stream_is_one_line_naming_the_models_streams(tmp_path):
    Image.new("RGB", (64, 64), (40, 90, 200)).save(tmp_path / "a.png")
    res = cli("task=probe", "model=tiny_sd3", "model.word_stream=umt5", f"image={tmp_path / 'a.png'}",
              f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    one_line_error(res, "word_stream 'umt5' is not a text stream of tiny_sd3; known: all, clip, t5")
