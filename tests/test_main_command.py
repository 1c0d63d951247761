"""The README's main job: `python -m diffprobe task=diffseg` on the packaged mini model and a world scene."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image


def test_readme_main_command_segments_a_world_scene_from_any_directory(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "diffprobe", "task=diffseg", f"hydra.run.dir={out}"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "Loading weights" not in res.stderr and "%|" not in res.stderr  # no library progress bars
    summary = json.loads((out / "summary.json").read_text())
    (key, record), = summary["images"].items()
    assert key == "demo_scene.png" and record["dir"] == "demo_scene"  # an input inside the run: relative to it
    assert 2 <= record["num_segments"] <= 30  # the mini model's threshold splits the scene, not into noise
    labels = np.asarray(Image.open(out / "demo_scene" / "labels.png"))
    assert labels.shape == (256, 256) and len(np.unique(labels)) == record["num_segments"]
    for name in ("overlay.png", "figure.png", "segments.json"):
        assert (out / "demo_scene" / name).is_file()
