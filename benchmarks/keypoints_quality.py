"""Keypoint quality on the procedural world's faces (CelebA/MAFL layout) with the embedded mini model.

    python benchmarks/keypoints_quality.py --out /tmp/kpq [--steps 50]

1. writes world faces in the CelebA/MAFL layout (task=world) unless --data is given;
2. fits keypoints (task=keypoints mode=fit) on the unsupervised split;
3. evaluates (mode=eval: regressor on MAFL train, inter-ocular error on MAFL test) the fitted
   embeddings and a baseline: the untrained initial embeddings with tokens chosen by the same vote;
4. prints a table, with the error of predicting the training faces' mean landmarks for every test
   face as the no-information baseline. Each step is skipped when its output exists (rerun to resume).
The world's faces are 64 px; maps are 32 x 32 (sigma 1 px, the reference's 2 px at 128 scaled).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMON = ["model=mini", "keypoints.fit.sigma=1.0", "keypoints.upsample_queries=32", "keypoints.predict.augmentations=3",
          "keypoints.predict.batch_size=1"]


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "diffprobe", "task=keypoints", *COMMON, *args], cwd=REPO, check=True)


def baseline(data: Path, out: Path, seed: int = 0) -> Path:
    """Untrained embeddings (the fit's start) with K tokens chosen by the fit's vote."""
    import torch

    from diffprobe.backbones import load_backbone
    from diffprobe.heads.keypoints.fit import FitConfig, choose_keypoints, config_dict, initial_embeddings
    from diffprobe.heads.keypoints.image_sets import ImageSet
    from diffprobe.heads.keypoints.maps import MapSpec, default_sites
    from diffprobe.heads.keypoints.state import KeypointModel, save_model
    from diffprobe.tasks.keypoints_data import split_items

    torch.set_num_threads(1)
    bb = load_backbone({"name": "mini", "path": str(REPO / "diffprobe" / "assets" / "mini")})
    spec = MapSpec(tuple(default_sites(bb.probe.sites)), res=32)
    cfg = FitConfig(sigma=1.0, seed=seed)
    images = ImageSet(split_items({"name": "celeba", "root": str(data), "fit_split": "unsupervised"}, "fit"),
                      bb.sample_size)
    emb = initial_embeddings(cfg, bb.context_dim)
    indices, counts = choose_keypoints(bb, spec, cfg, images, emb)
    config = {**config_dict(cfg, spec), "image_size": images.size, "crop": images.crop, "model": "mini"}
    return save_model(out / "keypoints", KeypointModel(emb, indices, config, counts))


def mean_landmarks_error(run: Path) -> float:
    """Inter-ocular error % of predicting every test face's landmarks as the training faces' mean (no image)."""
    from diffprobe.eval.landmarks import inter_ocular_error
    from diffprobe.io import load_tensors

    train, _ = load_tensors(run / "eval_train_state.safetensors")
    test, _ = load_tensors(run / "eval_test_state.safetensors")
    mean = train["rows.gt"].numpy().mean(axis=0, keepdims=True)
    gt = test["rows.gt"].numpy()
    return inter_ocular_error(mean.repeat(len(gt), axis=0), gt)["inter_ocular_error_percent"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eval-train", type=int, default=200)
    args = ap.parse_args()
    out = args.out.resolve()
    data = args.data or out / "world_celeba"
    if not (data / "MAFL").is_dir():
        subprocess.run([sys.executable, "-m", "diffprobe", "task=world", "world.format=celeba", "world.n=100",
                        "world.n_train=300", f"world.out={data}", f"hydra.run.dir={out / 'world_run'}"],
                       cwd=REPO, check=True)
    data_args = ["data=celeba", f"data.root={data}"]
    if not (out / "fit" / "keypoints.safetensors").is_file():
        cli("mode=fit", *data_args, f"keypoints.fit.steps={args.steps}", f"keypoints.fit.lr={args.lr}",
            f"hydra.run.dir={out / 'fit'}")
    if not (out / "baseline" / "keypoints.safetensors").is_file():
        baseline(data, out / "baseline")
    rows = []
    for name in ("baseline", "fit"):
        run = out / f"eval_{name}"
        if not (run / "metrics.json").is_file():
            cli("mode=eval", *data_args, f"embeddings={out / name / 'keypoints.safetensors'}",
                f"keypoints.eval.train={args.eval_train}", f"resume={run}", f"hydra.run.dir={run}")
        rows.append((name, json.loads((run / "metrics.json").read_text())))
    print("\n| embeddings | K | regressor train images | test images | inter-ocular error % |")
    print("|---|---|---|---|---|")
    for name, m in rows:
        label = "untrained (initial) + vote" if name == "baseline" else f"fitted, {args.steps} Adam steps"
        print(f"| {label} | {m['num_keypoints']} | {m['num_train']} | {m['num_test']} | "
              f"{m['inter_ocular_error_percent']:.2f} |")
    m = rows[-1][1]
    print(f"| none: mean training landmarks | - | {m['num_train']} | {m['num_test']} | "
          f"{mean_landmarks_error(out / 'eval_fit'):.2f} |")


if __name__ == "__main__":
    main()
