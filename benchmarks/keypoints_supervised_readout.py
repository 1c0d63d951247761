"""Landmarks read directly from landmark-supervised tokens in the keypoint maps, and the grid floor.

    python benchmarks/keypoints_supervised_readout.py --data DIR [--model mini] [--path PIPELINE] [--steps 200]

StableKeypoints finds keypoints by optimising context embeddings without labels. This asks how well these maps
place the landmarks themselves when told where they are, on a CelebA-layout export (task=world
world.format=celeba): one token per landmark, optimised **with** the training landmarks as targets, in exactly
the fit's maps (the same sites, query grid, timestep and the same 500-token softmax: the other tokens are the
fit's fixed initial embeddings). Loss: the cross-entropy between each token's map normalised over pixels and a
Gaussian (std 1 map pixel) at its landmark; Adam, batches of 8 training images. On the test images each token's
argmax (and the centroid of its whole map) is its landmark, scored by the inter-ocular error beside the
training images' mean landmarks. It is a direct readout, not a ceiling of the evaluation protocol: there a
regressor maps K found points to the landmarks and can correct their offsets. The floor rows put every true
landmark at the centre of its map cell: the error of a perfect argmax read out at that grid.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def load_split(root: Path, role: str, size: int):
    """(images (N, 3, S, S) in [-1, 1], landmarks (N, L, 2) in [0, 1] of the square) of a MAFL split."""
    from diffprobe.heads.keypoints.image_sets import ImageSet
    from diffprobe.tasks.keypoints_data import split_items

    images = ImageSet(split_items({"name": "celeba", "root": str(root), f"{role}_split": f"mafl_{role}"}, role),
                      size, crop="none")
    x, y = [], []
    for i in range(len(images)):
        tensor, frame, _ = images.load(i)
        x.append(tensor)
        y.append(images.landmarks(i, frame)[0])
    return torch.cat(x), torch.tensor(np.stack(y), dtype=torch.float32)


def gaussian_targets(points: torch.Tensor, res: int, sigma: float = 1.0) -> torch.Tensor:
    """(B, L, res, res) Gaussians summing to 1, std `sigma` map pixels, at points (B, L, 2) in [0, 1]."""
    from diffprobe.heads.keypoints.targets import gaussian_maps

    g = gaussian_maps(points * res, (res, res), sigma)
    return g / g.sum((-1, -2), keepdim=True)


def readouts(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"argmax", "centroid" (of the whole map)}: (B, L, 2) points in [0, 1] of maps (B, L, res, res)."""
    from diffprobe.heads.keypoints.targets import argmax_points, soft_argmax_points

    res = maps.shape[-1]
    return {"argmax": argmax_points(maps) / res, "centroid": soft_argmax_points(maps, radius=2.0 * res) / res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a CelebA-layout export (task=world world.format=celeba)")
    ap.add_argument("--model", default="mini", help="a conf/model name")
    ap.add_argument("--path", default=None, help="another pipeline directory for that model config")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--res", type=int, default=32, help="query grid of the maps (the quality benchmark's 32)")
    ap.add_argument("--sites", nargs="*", default=None, help="registry names or globs; default: the fit's")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from omegaconf import OmegaConf

    from diffprobe.loading import load_backbone
    from diffprobe.eval.landmarks import inter_ocular_error
    from diffprobe.training.keypoints import FitSettings, initial_embeddings
    from diffprobe.heads.keypoints.maps import MapSettings, resolve_sites
    from diffprobe.training.keypoints import attention_maps

    torch.manual_seed(0)
    conf = OmegaConf.load(REPO / "conf" / "model" / f"{args.model}.yaml")
    if args.path:
        conf.path = args.path
    bb = load_backbone(conf)
    spec = MapSettings(tuple(resolve_sites(bb.probe.sites, args.sites)), res=args.res)
    x_train, y_train = load_split(args.data, "train", bb.sample_size)
    x_test, y_test = load_split(args.data, "test", bb.sample_size)
    n_marks = y_train.shape[1]
    fixed = initial_embeddings(FitSettings(), bb.context_dim)
    learned = fixed[:n_marks].clone().requires_grad_(True)
    tokens = torch.arange(n_marks)
    opt = torch.optim.Adam([learned], lr=args.lr)

    def maps(x: torch.Tensor) -> torch.Tensor:
        return attention_maps(bb, spec, x, torch.cat([learned, fixed[n_marks:]]), torch.Generator().manual_seed(0),
                              tokens)

    start, order = time.time(), torch.Generator().manual_seed(1)
    for step in range(args.steps):
        idx = torch.randint(0, len(x_train), (8,), generator=order)
        m = maps(x_train[idx])
        p = m / m.sum((-1, -2), keepdim=True)
        loss = -(gaussian_targets(y_train[idx], args.res) * torch.log(p + 1e-8)).sum((-1, -2)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    with torch.no_grad():
        found = readouts(torch.cat([maps(x_test[i:i + 8]) for i in range(0, len(x_test), 8)]))
    mean = y_train.mean(0, keepdim=True).expand_as(y_test)
    rows = {f"supervised tokens, {name}": inter_ocular_error(p.numpy(), y_test.numpy())["inter_ocular_error_percent"]
            for name, p in found.items()}
    for res in sorted({16, args.res}):  # mini's finest attention grid, and the maps' query grid
        snapped = (torch.floor(y_test * res).clamp(0, res - 1) + 0.5) / res
        rows[f"floor: each true landmark at the centre of its {res} x {res} cell"] = inter_ocular_error(
            snapped.numpy(), y_test.numpy())["inter_ocular_error_percent"]
    rows["no image: mean training landmarks"] = inter_ocular_error(mean.numpy(), y_test.numpy())[
        "inter_ocular_error_percent"]
    print(f"\n{len(x_train)} train / {len(x_test)} test faces, {args.steps} steps, sites {list(spec.sites)}, "
          f"{time.time() - start:.0f} s\n| landmarks from | inter-ocular error % |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "steps": args.steps, "sites": list(spec.sites)}, indent=1))


if __name__ == "__main__":
    main()
