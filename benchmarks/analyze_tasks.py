"""task=analyze with all five image tasks from one command line against the five tasks run one by one.

    python benchmarks/analyze_tasks.py [--images 8] [--out DIR]

diffprobe-mini (as shipped), world test scenes (seed 7) at 64 px, random keypoint embeddings (12 tokens, 3 keypoints,
maps at 32) and a random hyperfeature aggregator (8 decoder layers, inversion of 4 steps, all saved), both saved
as mode=fit and mode=train save theirs. Reports the wall time of each command (model loading included: that is
what a user pays), the denoiser passes per image, and whether every file the combined run wrote equals the
separate run's (JSON and label/mask PNGs byte for byte, tensors to 1e-5, pictures of float maps to a few grey
levels in under 1 % of pixels, as tests/test_analyze.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TASKS = {"diffseg": ["diffseg.tau=0.2", "diffseg.noise=true"],
         "localize": ["localize.words=[circle]", "localize.prompt=a red circle", "localize.noise=true"],
         "probe": ["probe.timestep=300", "probe.noise=true"],
         "keypoints": [],   # filled with the embeddings' path
         "hyperfeatures": []}
MODES = {"keypoints": ["keypoints.mode=predict"], "hyperfeatures": ["hyperfeatures.mode=extract"]}


def cli(out: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffprobe", *args, f"hydra.run.dir={out}"], cwd=REPO, check=True,
                   capture_output=True)
    return time.perf_counter() - start


def learned_state(tmp: Path) -> tuple[Path, Path]:
    import torch

    from diffprobe.heads.hyperfeatures.extract import ExtractionSettings
    from diffprobe.heads.hyperfeatures.model import HyperfeatureModel
    from diffprobe.heads.keypoints.state import KeypointModel, save_model
    from diffprobe.loading import load_backbone
    from diffprobe.mini import packaged_path

    bb = load_backbone({"path": str(packaged_path())})
    sites = ["up_blocks.3.attentions.0.transformer_blocks.0.attn2.hook_probs"]
    emb = torch.randn(12, bb.context_dim, generator=torch.Generator().manual_seed(0))
    maps = {"sites": sites, "res": 32, "timestep": 0, "noise": True}
    keypoints = save_model(tmp / "keypoints", KeypointModel(emb, torch.tensor([3, 7, 1]), {
        "maps": maps, "image_size": 64, "crop": "center", "resize": "bilinear"}))
    extraction = ExtractionSettings(layers="up_blocks.*.resnets.*.hook_residual", num_steps=4, save_every=1,
                                    image_size=64)
    weights = HyperfeatureModel.build(bb.probe.sites, extraction, output_size=8, projection_dim=64).save(tmp / "hf")
    return keypoints, weights


def same(a: Path, b: Path) -> bool:
    from PIL import Image
    from safetensors.numpy import load_file

    if a.suffix == ".safetensors":
        x, y = load_file(a), load_file(b)
        return x.keys() == y.keys() and all(np.allclose(x[k], y[k], atol=1e-5) for k in x)
    if a.suffix == ".png" and not (a.name == "labels.png" or a.name.endswith("_mask.png")):
        x, y = (np.asarray(Image.open(p), np.int16) for p in (a, b))
        return x.shape == y.shape and (x != y).mean() < 1e-2 and np.abs(x - y).mean() < 0.05
    return a.read_bytes() == b.read_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="analyze_tasks_"))
    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"
    cli(out / "world", "task=world", "world.format=images", f"world.n={args.images}", "seed=7",
        f"world.out={images}")
    folder = next(p.parent for p in sorted(images.rglob("*.png")))
    embeddings, weights = learned_state(out)
    TASKS["keypoints"] = [f"keypoints.embeddings={embeddings}", "keypoints.predict.augmentations=4"]
    TASKS["hyperfeatures"] = [f"hyperfeatures.weights={weights}"]
    common = [f"image={folder}"]
    combined = cli(out / "all", "task=analyze", f"analyze.tasks=[{','.join(TASKS)}]", *common,
                   *[k for ks in TASKS.values() for k in ks])
    separate, files, equal = {}, 0, 0
    for task, keys in TASKS.items():
        separate[task] = cli(out / task, f"task={task}", *common, *keys, *MODES.get(task, []))
        for f in sorted((out / task).rglob("*")):
            rel = f.relative_to(out / task)
            if f.is_file() and rel.parts[0] not in (".hydra",) and not rel.name.startswith((".", "images_")) \
                    and rel.name not in ("summary.json", "run.log", "__main__.log"):
                files += 1
                equal += int(same(f, out / "all" / task / rel))
    total = sum(separate.values())
    print(json.dumps({"images": args.images, "combined_s": combined, "separate_s": separate, "separate_total_s": total,
                      "ratio": combined / total, "files": files, "equal": equal}, indent=1))
    print(f"\n| images | combined s | separate s ({' + '.join(TASKS)}) | ratio | files equal |")
    print("|---|---|---|---|---|")
    print(f"| {args.images} | {combined:.1f} | {' + '.join(f'{separate[t]:.1f}' for t in TASKS)} = {total:.1f} | "
          f"{combined / total:.2f} | {equal} / {files} |")


if __name__ == "__main__":
    main()
