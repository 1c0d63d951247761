"""task=analyze: several heads from one pass write, file for file, what their own tasks write."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parent.parent


def cli(tmp: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "diffprobe", *args, f"hydra.run.dir={tmp}"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def learned_state(tmp: Path) -> tuple[Path, Path]:
    """Keypoint embeddings and a hyperfeature aggregator for diffprobe-mini, random but saved as mode=fit and
    mode=train save theirs."""
    import torch

    from diffprobe.loading import load_backbone
    from diffprobe.heads.hyperfeatures.extract import ExtractionSettings
    from diffprobe.heads.hyperfeatures.model import HyperfeatureModel
    from diffprobe.heads.keypoints.maps import MapSettings
    from diffprobe.heads.keypoints.state import KeypointModel, save_model
    from diffprobe.mini import packaged_path

    bb = load_backbone({"path": str(packaged_path())})
    sites = ("up_blocks.3.attentions.0.transformer_blocks.0.attn2.hook_probs",)
    spec = MapSettings(sites, res=32, timestep=0, noise=True)
    emb = torch.randn(12, bb.context_dim, generator=torch.Generator().manual_seed(0))
    keypoints = save_model(tmp / "keypoints", KeypointModel(emb, torch.tensor([3, 7, 1]), {
        "maps": {**spec.__dict__, "sites": list(sites)}, "image_size": 64, "crop": "center", "resize": "bilinear"}))
    extraction = ExtractionSettings(layers="up_blocks.*.resnets.*.hook_residual", num_steps=4, save_every=2,
                                  image_size=64)
    weights = HyperfeatureModel.build(bb.probe.sites, extraction, output_size=8, projection_dim=16).save(tmp / "hf")
    return keypoints, weights


def page_data(path) -> dict:
    """The data a report.html embeds."""
    text = path.read_text()
    return json.loads(text.split("const D = ", 1)[1].split(";\n", 1)[0].replace("<\\/", "</"))


def test_one_pass_writes_what_separate_runs_write(tmp_path):
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(photo)
    embeddings, weights = learned_state(tmp_path)
    keys = {"diffseg": ["diffseg.tau=0.2", "diffseg.noise=true"],          # noisy latents: each head draws
            "localize": ["localize.words=[bird]", "localize.prompt=a red bird", "localize.noise=true"],
            "probe": ["probe.timestep=300", "probe.noise=true"],
            "keypoints": [f"keypoints.embeddings={embeddings}", "keypoints.predict.augmentations=3"],
            "hyperfeatures": [f"hyperfeatures.weights={weights}"]}
    modes = {"keypoints": ["keypoints.mode=predict"], "hyperfeatures": ["hyperfeatures.mode=extract"]}
    cli(tmp_path / "all", "task=analyze", f"analyze.tasks=[{','.join(keys)}]", f"image={photo}",
        *[k for ks in keys.values() for k in ks])
    for task in keys:
        cli(tmp_path / task, f"task={task}", f"image={photo}", *keys[task], *modes.get(task, []))
        alone, together = files(tmp_path / task / "photo"), files(tmp_path / "all" / task / "photo")
        assert alone.keys() == together.keys() and len(alone) >= 2, task
        for name in alone:  # equal up to float rounding (the shared batch has more rows): tensors to 1e-5,
            a_path, b_path = tmp_path / task / "photo" / name, tmp_path / "all" / task / "photo" / name
            if name.endswith(".safetensors"):
                a, b = load_file(a_path), load_file(b_path)
                assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-5) for k in a), (task, name)
            elif name == "labels.png" or name.endswith("_mask.png"):  # labels and masks exactly
                assert alone[name] == together[name], (task, name)
            elif name == "report.html":  # the page's maps to one level of 255, its peaks to float rounding
                a, b = page_data(a_path), page_data(b_path)
                assert (a["words"], a["layers"], a["slices"].keys()) == (b["words"], b["layers"], b["slices"].keys())
                for k in a["slices"]:
                    qa, qb = (np.frombuffer(base64.b64decode(d["slices"][k]["maps"]), np.uint8).astype(int)
                              for d in (a, b))
                    assert np.abs(qa - qb).max() <= 1 and np.allclose(a["slices"][k]["peak"], b["slices"][k]["peak"],
                                                                        rtol=1e-4), (task, name, k)
            elif name.endswith(".png"):  # pictures of float maps: a few grey levels in a few pixels
                a, b = (np.asarray(Image.open(p), np.int16) for p in (a_path, b_path))
                assert a.shape == b.shape and (a != b).mean() < 1e-2 and np.abs(a - b).mean() < 0.05, (task, name)
            else:                        # JSON byte for byte
                assert alone[name] == together[name], (task, name)
        summaries = [json.loads((folder / "summary.json").read_text()) for folder in (tmp_path / task, tmp_path / "all" / task)]
        assert summaries[0]["images"] == summaries[1]["images"], task


def test_heads_that_share_a_drive_make_one_call_per_image(monkeypatch, tmp_path):
    from config_helpers import make_cfg

    from diffprobe import runner
    from diffprobe.tasks import analyze

    passes = []
    real = runner.run_plans
    monkeypatch.setattr(runner, "run_plans", lambda bb, plans, *a, **k: passes.append(len(plans)) or real(bb, plans, *a, **k))
    cfg = make_cfg("analyze", model="mini", **{"analyze.tasks": ["diffseg", "localize", "probe"], "probe.timestep": 300})
    analyze.run(cfg, tmp_path)
    assert passes == [3]                      # three heads (diffseg, localize, probe), one pass
    passes.clear()
    cfg = make_cfg("analyze", model="mini", **{"analyze.tasks": ["diffseg", "probe"]})   # probe at t=100: its own
    analyze.run(cfg, tmp_path / "two")
    assert passes == [1, 1]


def test_unknown_tasks_are_refused(tmp_path):
    from config_helpers import make_cfg

    from diffprobe.errors import DiffprobeError
    from diffprobe.tasks import analyze

    with pytest.raises(DiffprobeError, match="analyze.tasks"):
        analyze.run(make_cfg("analyze", model="mini", **{"analyze.tasks": ["diffseg", "templates"]}), tmp_path)
