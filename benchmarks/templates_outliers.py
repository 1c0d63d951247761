"""How well the template fit tells misplaced keypoints from true ones, on world figures whose points are
exact (so every point flagged on a clean set is a false alarm).

    python benchmarks/templates_outliers.py [--n-train 500] [--n-test 300] [--floors 0.1 0.2 0.3]

Per category: templates (k = 14) from n-train train close-ups; n-test val close-ups fitted clean, then
with one visible point per set moved by half the set's box diagonal in a random direction. Columns:
false alarms on clean sets, planted points detected, other points of the corrupted sets flagged. Rows per
OUTLIER_FLOOR (the minimum residual, as a fraction of the box diagonal, for a point to be an outlier).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import diffprobe.heads.templates.fit as fit  # noqa: E402
from diffprobe.heads.templates import cluster  # noqa: E402
from diffprobe.heads.templates.normalise import normalise  # noqa: E402
from diffprobe.tasks.templates import TemplateSettings, world_sets  # noqa: E402


def corrupt(points: np.ndarray, visible: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """points with one visible point per set moved by half the box diagonal; the moved indices (N,)."""
    out, moved = points.copy(), []
    for i in range(len(points)):
        j = rng.choice(np.flatnonzero(visible[i]))
        diag = np.hypot(*np.ptp(points[i][visible[i]], axis=0))
        angle = rng.uniform(0, 2 * np.pi)
        out[i, j] += 0.5 * diag * np.array([np.cos(angle), np.sin(angle)])
        moved.append(j)
    return out, np.array(moved)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--floors", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    args = ap.parse_args()
    print("| category | outlier floor | false alarms (clean) | planted detected | others flagged (corrupted) |")
    print("|---|---|---|---|---|")
    for category in ("face", "bird", "house"):
        train = world_sets(TemplateSettings(category=category, n=args.n_train), 0)
        templates = cluster.fit_templates(normalise(train.points, train.visible), k=14).points
        test = world_sets(TemplateSettings(category=category, n=args.n_test, split="val"), 0)
        bad, moved = corrupt(test.points, test.visible, np.random.default_rng(0))
        rows = np.arange(len(moved))
        others = test.visible.copy()
        others[rows, moved] = False
        for floor in args.floors:
            fit.OUTLIER_FLOOR = floor
            clean = fit.fit_to_templates(templates, test.points, test.visible)
            corrupted = fit.fit_to_templates(templates, bad, test.visible)
            print(f"| {category} | {floor:.1f} | {clean.outlier[test.visible].mean():.3f} | "
                  f"{corrupted.outlier[rows, moved].mean():.3f} | {corrupted.outlier[others].mean():.3f} |")


if __name__ == "__main__":
    main()
