"""How well the true pose of the world's close-up faces predicts their landmarks, with the keypoint evaluation's
own regressor: what keypoints must at least find to reach a given inter-ocular error.

    python benchmarks/keypoints_pose_oracle.py --data DIR   # a task=world export in the CelebA layout (world.json)

Per face, two "oracle keypoints" built from the renderer's pose, fed to the bias-free regressor of
`diffprobe.eval.landmarks` (fit on MAFL training.txt, error on testing.txt), beside the mean training landmarks:
- the face's box: centre -/+ half its size, no rotation (what a detector of the whole face could give);
- the same two points rotated by the face's true angle (position, size and in-plane rotation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diffprobe.data.celeba import CelebaDataset
from diffprobe.eval.landmarks import apply_regressor, fit_regressor, inter_ocular_error


def oracle_points(pose: dict, size: float, rotated: bool) -> np.ndarray:
    """(2, 2) points in [0, 1]: the face's centre -/+ half its scale along x (rotated by its angle if asked) and
    along y in the unrotated box."""
    centre, half = np.asarray(pose["center"], float), pose["scale"] / 2
    if rotated:
        c, s = np.cos(pose["angle"]), np.sin(pose["angle"])
        offset = np.array([c * half, s * half])
    else:
        offset = np.array([half, half])
    return np.stack([centre - offset, centre + offset]) / size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--size", type=float, default=64.0, help="image side in pixels")
    args = ap.parse_args()
    world = json.loads((args.data / "world.json").read_text())
    splits = {s: list(CelebaDataset(args.data, split=s)) for s in ("mafl_train", "mafl_test")}
    gt = {s: np.stack([r.landmarks for r in recs]) / args.size for s, recs in splits.items()}
    rows = [("mean training landmarks (no image)",
             inter_ocular_error(np.broadcast_to(gt["mafl_train"].mean(0), gt["mafl_test"].shape), gt["mafl_test"]))]
    for label, rotated in (("true face box, no rotation", False), ("true face box rotated by its true angle", True)):
        pts = {s: np.stack([oracle_points(world[r.name]["objects"][0]["pose"], args.size, rotated) for r in recs])
               for s, recs in splits.items()}
        W = fit_regressor(pts["mafl_train"], gt["mafl_train"])
        rows.append((label, inter_ocular_error(apply_regressor(W, pts["mafl_test"]), gt["mafl_test"])))
    print(f"{len(splits['mafl_train'])} train / {len(splits['mafl_test'])} test faces\n")
    print("| keypoints fed to the regressor | inter-ocular error % |\n|---|---|")
    for label, m in rows:
        print(f"| {label} | {m['inter_ocular_error_percent']:.2f} |")


if __name__ == "__main__":
    main()
