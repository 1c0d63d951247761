"""task=patch: restoring the UNet's last block at every step gives the clean image back (effect 1, exactly as the
model's output is a function of that block's output alone); nothing before the first block matters; the run writes
its files, resumes site by site and refuses what it cannot trace."""

import json

import pytest
from safetensors.torch import load_file

from config_helpers import make_cfg
from diffprobe.errors import DiffprobeError
from diffprobe.tasks import patch


def test_restoring_the_last_block_everywhere_gives_the_clean_image_and_the_run_resumes(tmp_path, monkeypatch):
    cfg = make_cfg("patch", clean="a red cat", corrupt="a blue dog", steps=2)
    summary = patch.run(cfg, tmp_path)
    sites = [s["site"] for s in summary["sites"]]
    assert sites[-1] == "up_blocks.3.hook_out" and all(s.endswith(".hook_out") for s in sites)
    last = summary["sites"][-1]
    assert last["effect_every_step"] == pytest.approx(1.0, abs=1e-5)     # the output depends on it alone
    effect = load_file(tmp_path / "patch.safetensors")["effect"]
    assert effect.shape == (len(sites), 3)                                # 2 steps and "every step"
    assert float(effect.max()) <= 1 + 1e-5
    for name in ("clean.png", "corrupt.png", "patch.png", "patch.json"):
        assert (tmp_path / name).is_file()
    def recomputed(*args):
        raise AssertionError("a finished site was traced again")
    monkeypatch.setattr(patch.Tracer, "site_effects", recomputed)
    again = patch.run(cfg, tmp_path)                                      # every site done: nothing recomputed
    assert again["sites"] == summary["sites"]
    assert json.loads((tmp_path / "patch.json").read_text())["clean"] == "a red cat"


def test_refusals(tmp_path):
    with pytest.raises(DiffprobeError, match="needs clean="):
        patch.settings_of(make_cfg("patch", clean="a cat"))
    with pytest.raises(DiffprobeError, match="restores feature sites"):
        patch.run(make_cfg("patch", clean="a cat", corrupt="a dog", steps=1, sites=["*.attn2.hook_probs"]),
                  tmp_path / "a")
    with pytest.raises(DiffprobeError, match="same image"):
        patch.run(make_cfg("patch", clean="a cat", corrupt="a cat", steps=1), tmp_path / "b")


def test_a_real_image_is_traced_from_its_inversion(tmp_path):
    """image=: both generations start from the image's DDIM inversion under the clean prompt, not from the seed's
    noise (another seed gives the same trace), and the last block restored at every step still undoes the
    corruption exactly; a folder is refused."""
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "p.png")
    runs = []
    for seed in (0, 1):
        cfg = make_cfg("patch", clean="a red cat", corrupt="a blue dog", steps=2, guidance=1.0,
                       sites=["up_blocks.3.hook_out"])
        cfg.image, cfg.seed = str(tmp_path / "p.png"), seed
        runs.append(patch.run(cfg, tmp_path / f"out{seed}"))
    assert runs[0]["image"].endswith("p.png")
    assert runs[0]["sites"][0]["effect_every_step"] == pytest.approx(1.0, abs=1e-5)
    assert runs[1]["distance_corrupt_clean"] == pytest.approx(runs[0]["distance_corrupt_clean"], rel=1e-6)
    cfg.image = str(tmp_path)
    with pytest.raises(DiffprobeError, match="one image file"):
        patch.run(cfg, tmp_path / "folder")
