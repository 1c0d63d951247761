"""Image reading for odd files and modes; the command line's outputs and its one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffprobe.__main__ import rewrite_data_paths
from diffprobe.data.images import center_square, image_to_tensor, list_images, load_image
from diffprobe.errors import DiffprobeError
from diffprobe.io import load_tensors, save_json

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "LA", "1"])
def test_load_image_any_mode_gives_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray((rng.random((9, 7)) * 65535).astype(np.uint16))
    else:
        img = Image.fromarray((rng.random((9, 7, 3)) * 255).astype(np.uint8)).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (7, 9)


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    arr = np.asarray(load_image(tmp_path / "a.png"))
    assert (arr[0, 0] == [255, 0, 0]).all() and (arr[3, 0] == [255, 255, 255]).all()


def test_bad_image_inputs_raise_one_line_errors(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "trunc.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    for path, pattern in [(tmp_path / "missing.png", "not found"), (tmp_path / "notes.png", "not a readable image"),
                          (tmp_path / "trunc.png", "not a readable image"), (tmp_path, "is a folder")]:
        with pytest.raises(DiffprobeError, match=pattern) as info:
            load_image(path)
        assert "\n" not in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DiffprobeError, match="no image files"):
        list_images(empty)


def test_center_crop_and_scaling():
    assert center_square(120, 80) == (20, 0, 80) and center_square(50, 90) == (0, 20, 50)
    arr = np.zeros((80, 120, 3), np.uint8)
    arr[:, 20:100] = 255  # the centred square is white, the margins black
    x = image_to_tensor(Image.fromarray(arr), 16)
    assert x.shape == (1, 3, 16, 16) and float(x.min()) == 1.0 == float(x.max())


def test_data_path_rewrite():
    assert rewrite_data_paths(["task=x", "data=some/dir"]) == ["task=x", "data=folder", "data.root=some/dir"]
    assert rewrite_data_paths(["data=folder", "data.root=a"]) == ["data=folder", "data.root=a"]


def test_atomic_writers_leave_nothing_on_failure(tmp_path):
    with pytest.raises(TypeError):
        save_json(tmp_path / "out.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(DiffprobeError, match="not a readable safetensors"):
        load_tensors(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    import torch

    from diffprobe.io import save_tensors

    old = os.umask(umask)
    try:
        written = [save_json(tmp_path / "a.json", {"x": 1}), save_tensors(tmp_path / "w.safetensors",
                                                                          {"w": torch.zeros(2)})]
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in written] == [mode, mode]


def _cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "diffprobe", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def test_probe_cli_writes_outputs_and_errors_cleanly(tmp_path):
    img = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "scene.png")
    out = tmp_path / "run"
    res = _cli("task=probe", f"image={tmp_path / 'scene.png'}", "model=tiny_sd15", "prompt=a cat",
               "sites=[up_blocks.1.*.attn2.hook_probs,up_blocks.3.resnets.2.hook_residual]", f"hydra.run.dir={out}",
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    index = json.loads((out / "scene" / "index.json").read_text())
    assert index["tokens"][:3] == ["<|startoftext|>", "a</w>", "cat</w>"]
    tensors, meta = load_tensors(out / "scene" / "captures.safetensors")
    assert set(tensors) == set(index["sites"]) and len(tensors) == 4 and meta["timestep"] == "100"
    cross = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.hook_probs"
    assert list(tensors[cross].shape) == index["sites"][cross]["shape"] == [1, 4, 77]
    assert Image.open(out / "scene" / "attention.png").size[0] > 100

    for args, message in [
        (["image=/no/such.png"], "image path not found"),
        ([f"image={tmp_path}", "sites=[nothing*]"], "matches no capture site"),
        ([f"image={tmp_path / 'scene.png'}", "model=sd15", "model.path=/no/weights"], "not a diffusers model directory"),
    ]:
        res = _cli("task=probe", *args, f"hydra.run.dir={tmp_path / 'err'}", cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_without_an_image_a_world_scene_is_used(tmp_path):
    out = tmp_path / "run"
    res = _cli("task=probe", "model=tiny_sd15", f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert Image.open(out / "demo_scene.png").size == (256, 256)
    assert (out / "demo_scene.txt").read_text().strip()  # the scene's caption
    assert (out / "demo_scene" / "captures.safetensors").is_file()


def test_resize_filters_follow_the_references():
    # a horizontal ramp 0, 100, 200, 255 halved: tf.image.resize (DiffSeg's loader) samples at half-pixel
    # centres without antialiasing, so each output pixel averages its two source pixels exactly
    ramp = np.repeat(np.repeat(np.array([[0, 100, 200, 255]], np.uint8), 2, axis=0)[..., None], 3, axis=2)
    img = Image.fromarray(ramp)
    tf_like = image_to_tensor(img, (2, 2), crop="none", resize="bilinear_tf")
    torch.testing.assert_close(tf_like[0, 0, 0], torch.tensor([50.0, 227.5]) / 127.5 - 1.0)
    pil = image_to_tensor(img, (2, 2), crop="none", resize="bilinear")
    expected = np.asarray(img.resize((2, 2), Image.BILINEAR), np.float32)[0, :, 0] / 127.5 - 1.0
    torch.testing.assert_close(pil[0, 0, 0], torch.from_numpy(expected))
    assert not torch.allclose(pil, tf_like)  # PIL's bilinear filter widens when shrinking (antialiasing)
    with pytest.raises(DiffprobeError, match="resize must be one of"):
        image_to_tensor(img, 2, resize="lanczos")
