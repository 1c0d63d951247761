"""Keypoint quality with an embedded model (mini, or mini-dit) on the world's close-up faces (CelebA/MAFL layout) and
birds (CUB layout), beside three baselines computed on the same test images.

    python benchmarks/keypoints_quality.py --out DIR [--categories face bird] [--steps 500] [--model mini_dit]
                                           [--model-path PIPELINE] [--sites NAME ...]

Per category:
1. writes world close-ups in the dataset's layout (task=world: 300 train, 100 test) unless present;
2. fits keypoints (task=keypoints mode=fit) on the train split (the reference fits and votes there);
3. evaluates (mode=eval: bias-free regressor on the train split, the dataset's metric on test):
   - the fitted embeddings;
   - untrained: the fit's initial embeddings with K tokens chosen by the same vote;
   - random tokens: the initial embeddings, K tokens drawn at random (raw features, no selection);
   - mean landmarks: the training images' mean landmarks for every test image (no image; in metrics.json).
Each step is skipped when its output exists (rerun to resume). Images are 64 px; maps are 32 x 32
(sigma 1 px, the reference's 2 px at 128 scaled); K = 10, 500 tokens, the reference's lr unless --lr, its
10 test-time transforms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
COMMON = ["keypoints.fit.sigma=1.0", "keypoints.upsample_queries=32"]
LAYOUT = {"face": ("celeba", "inter_ocular_error_percent", "inter-ocular error %"),
          "bird": ("cub", "mean_l2_percent", "mean L2 % of the crop")}


def model_args(args) -> list[str]:
    """Overrides choosing the model, its weights (--model-path) and the keypoint sites (--sites)."""
    sites = [f"keypoints.sites=[{','.join(repr(s) for s in args.sites)}]"] if args.sites else []
    return [f"model={args.model}", *([f"model.path={args.model_path}"] if args.model_path else []), *sites]


def command(args, *overrides: str) -> list[str]:
    """The task=keypoints command line with the benchmark's model and map settings."""
    return [sys.executable, "-m", "diffprobe", "task=keypoints", *model_args(args), *COMMON, *overrides]


def cli(args, *overrides: str) -> float:
    """Run task=keypoints with the benchmark's model and map settings; its wall time in seconds."""
    start = time.time()
    subprocess.run(command(args, *overrides), cwd=REPO, check=True)
    return time.time() - start


def untrained(args, data_args: dict, out: Path, random_tokens: bool, seed: int = 0) -> Path:
    """The fit's initial embeddings with K tokens chosen by the fit's vote, or drawn at random."""
    import torch

    from diffprobe.loading import load_backbone
    from diffprobe.training.keypoints import FitSettings, choose_keypoints, config_dict, initial_embeddings
    from diffprobe.heads.keypoints.image_sets import ImageSet
    from diffprobe.heads.keypoints.maps import MapSettings, resolve_sites
    from diffprobe.heads.keypoints.state import KeypointModel, save_model
    from diffprobe.tasks.keypoints_data import split_items

    from omegaconf import OmegaConf

    torch.set_num_threads(1)
    model = OmegaConf.load(REPO / "conf" / "model" / f"{args.model}.yaml")
    if args.model_path:
        model.path = args.model_path
    bb = load_backbone(model)
    spec = MapSettings(tuple(resolve_sites(bb.probe.sites, args.sites or model.get("keypoints_sites"))), res=32)
    cfg = FitSettings(sigma=1.0, seed=seed)
    crop = "none" if data_args["name"] == "celeba" else "center"
    images = ImageSet(split_items(data_args, "fit"), bb.sample_size, crop=crop)
    emb = initial_embeddings(cfg, bb.context_dim)
    if random_tokens:
        indices = torch.from_numpy(np.random.default_rng(seed).choice(cfg.num_tokens, cfg.top_k, replace=False))
        counts = [0] * cfg.top_k
    else:
        indices, counts = choose_keypoints(bb, spec, cfg, images, emb)
    config = {**config_dict(cfg, spec), "image_size": images.size, "crop": images.crop, "model": args.model}
    return save_model(out / "keypoints", KeypointModel(emb, indices, config, counts))


def run_category(category: str, out: Path, args) -> list[tuple[str, float]]:
    fmt, key, _ = LAYOUT[category]
    data = out / f"world_{fmt}"
    if not (data / "done").is_file():
        subprocess.run([sys.executable, "-m", "diffprobe", "task=world", f"world.format={fmt}", "world.n=100",
                        "world.n_train=300", f"world.out={data}", f"hydra.run.dir={out / f'world_{fmt}_run'}"],
                       cwd=REPO, check=True)
        (data / "done").write_text("")
    root = data if fmt == "celeba" else data / "CUB_200_2011"
    data_args = [f"data={fmt}", f"data.root={root}"]
    timing = out / f"fit_{category}" / "wall_seconds.txt"
    if not (out / f"fit_{category}" / "keypoints.safetensors").is_file():
        lr = [f"keypoints.fit.lr={args.lr}"] if args.lr else []
        seconds = cli(args, "mode=fit", *data_args, f"keypoints.fit.steps={args.steps}", *lr,
                      f"hydra.run.dir={out / f'fit_{category}'}")
        timing.write_text(f"{seconds:.1f}\n")
    settings = {"name": fmt, "root": str(root), **({"fit_split": "mafl_train"} if fmt == "celeba" else
                                                    {"fit_split": "train", "crop_to_box": True, "box_margin": 0.05})}
    for name, random_tokens in (("untrained", False), ("random", True)):
        if not (out / f"{name}_{category}" / "keypoints.safetensors").is_file():
            untrained(args, settings, out / f"{name}_{category}", random_tokens)
    rows = []
    for name in ("fit", "untrained", "random"):
        run = out / f"eval_{name}_{category}"
        if not (run / "metrics.json").is_file():
            cli(args, "mode=eval", *data_args, f"embeddings={out / f'{name}_{category}' / 'keypoints.safetensors'}",
                f"keypoints.eval.train={args.eval_train}", f"resume={run}", f"hydra.run.dir={run}")
        rows.append((name, json.loads((run / "metrics.json").read_text())))
    fit_seconds = float(timing.read_text()) if timing.is_file() else float("nan")
    labels = {"fit": f"fitted, {args.steps} Adam steps ({fit_seconds / 60:.1f} min)",
              "untrained": "untrained (initial) + the same vote", "random": "untrained, K random tokens (raw features)"}
    table = [(labels[name], m[key]) for name, m in rows]
    table.append(("none: mean training landmarks", rows[0][1][f"baseline_mean_landmarks_{key}"]))
    return table, rows[0][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--categories", nargs="+", default=["face", "bird"], choices=list(LAYOUT))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=None, help="default: the reference's 5e-3")
    ap.add_argument("--eval-train", type=int, default=300)
    ap.add_argument("--model", default="mini", choices=["mini", "mini_dit"], help="the embedded model to fit on")
    ap.add_argument("--model-path", default=None, help="another pipeline directory of that model (e.g. a train_mini run)")
    ap.add_argument("--sites", nargs="+", default=None, help="cross-attention sites (default: the model's)")
    args = ap.parse_args()
    out = args.out.resolve()
    results = {}
    for category in args.categories:
        results[category] = run_category(category, out, args)
    for category, (table, m) in results.items():
        print(f"\n{category}s ({LAYOUT[category][0]} layout): K = {m['num_keypoints']}, regressor on "
              f"{m['num_train']} train images, {m['num_test']} test images")
        print(f"| keypoints | {LAYOUT[category][2]} |\n|---|---|")
        for label, value in table:
            print(f"| {label} | {value:.2f} |")


if __name__ == "__main__":
    main()
