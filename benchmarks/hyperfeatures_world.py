"""Hyperfeatures on the procedural world with diffprobe-mini: train on world pairs in the SPair-71k layout,
then the full model, its pruned ablation and one raw layer on the test pairs, in one table.

    python benchmarks/hyperfeatures_world.py --out /tmp/hfw [--model mini] [--train-steps 200]

Each step runs the real command line (task=world, task=hyperfeatures mode=train|ablate|baseline) and is
skipped when its output exists (rerun to resume). 20 test and 40 train pairs per category (faces, birds,
houses: 60 test pairs), S = 4 of T = 4 inversion calls (t = -1, 0, 250, 500).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "diffprobe", *args], cwd=REPO, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--train-steps", type=int, default=200)
    args = ap.parse_args()
    out = args.out.resolve()
    world = out / "world"
    common = [f"model={args.model}", "data=spair", f"data.root={world}", "hyperfeatures.num_steps=4",
              "hyperfeatures.save_every=1"]
    start = time.time()
    if not (world / "SPair-71k" / "world.json").is_file():
        cli("task=world", "world.format=spair", "world.n=20", "world.n_train=40", f"world.out={world}",
            f"hydra.run.dir={out / 'world_run'}")
    if not (out / "train" / "model" / "aggregator.json").is_file():
        cli("task=hyperfeatures", *common, f"hyperfeatures.train_steps={args.train_steps}",
            "hyperfeatures.val_every=100", f"hydra.run.dir={out / 'train'}")
    for mode in ("ablate", "baseline"):
        target = out / mode / ("ablation.json" if mode == "ablate" else "metrics.json")
        if not target.is_file():
            weights = [f"hyperfeatures.weights={out / 'train' / 'model'}"] if mode == "ablate" else []
            cli("task=hyperfeatures", *common, f"hyperfeatures.mode={mode}", *weights, f"hydra.run.dir={out / mode}")
    ablate = json.loads((out / "ablate" / "ablation.json").read_text())
    base = json.loads((out / "baseline" / "metrics.json").read_text())
    rows = [("raw up_blocks.1.resnets.0 at t=-1 (mode=baseline)", base["raw_layer"]),
            (f"pruned, raw (top cell: {ablate['pruned']['layer']}, call {ablate['pruned']['call']})",
             ablate["pruned_raw"]),
            ("pruned, through its bottleneck", ablate["pruned_bottleneck"]),
            ("hyperfeatures (full model)", ablate["hyperfeatures"])]
    print(f"\nworld test pairs: {ablate['pairs']}; {time.time() - start:.0f} s in this invocation\n")
    print("| descriptor | PCK@0.1_img (per point) | PCK@0.1_bbox (per point) |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['pck@0.1_img_per_point']:.3f} | {r['pck@0.1_bbox_per_point']:.3f} |")


if __name__ == "__main__":
    main()
