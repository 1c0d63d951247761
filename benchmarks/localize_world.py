"""Localisation of words on the procedural world with diffprobe-mini: every refinement and its settings chosen
on the val split, reported on test, beside raw cross-attention, all from the same captured calls.

    python benchmarks/localize_world.py [--n 200] [--model DIR] [--json out.json] [--divisors 2 4 8]

Per scene: one UNet call (DiffSeg's: clean latent, t=300) conditioned on the scene's caption; for every
category its caption names, that word's cross-attention map (heads averaged, resolutions aggregated) and the
aggregated self-attention. Ground truth: the boxes of the objects of that category (any counts) and the union
of their masks. Scores (diffprobe.eval.wsol, maps at 64 px): GT-known Loc, MaxBoxAccV2, PxAP. The settings
of each method with the best val MaxBoxAccV2 are reported on test, with the val-best mask threshold.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffprobe.loading import load_backbone  # noqa: E402
from diffprobe.data.images import image_to_tensor  # noqa: E402
from diffprobe.data.world import render_scene, scene_seed  # noqa: E402
from diffprobe.eval.wsol import WSOLMeter  # noqa: E402
from diffprobe.heads.localize import LocalizeHead, LocalizeSettings, RefineSettings, refine  # noqa: E402
from diffprobe.mini import packaged_path  # noqa: E402
from diffprobe.runner import run_plans  # noqa: E402

GRID = {  # method: list of RefineSettings overrides swept on val
    "raw": [{}],
    "power": [{"power": k} for k in (1, 2, 3, 4, 6, 8)],
    "walk": [{"restart": g} for g in (0.3, 0.5, 0.7, 0.9)],
    "diffusion, attention_rows graph": [{"beta": b, "temperature": t}
                                        for b, t in itertools.product((1, 3, 10, 30, 100), (0.05, 0.1, 0.2, 0.5))],
    "diffusion, attention graph": [{"graph": "attention", "beta": b} for b in (1, 3, 10, 30, 100)],
}


def scene_words(split: str, n: int, bb, size: int = 64, divisors=None) -> list[dict]:
    """Per (scene, category word): the word map, the scene's self-attention, the boxes and mask of the word."""
    out = []
    for i in range(n):
        scene = render_scene(scene_seed(split, i), size)
        words = sorted({o.category for o in scene.objects})
        settings = LocalizeSettings(words=words, prompt=scene.caption, divisors=divisors)
        head = LocalizeHead(settings, bb.word_positions(scene.caption, words), bb.sample_size)
        plan = head.plan(bb.probe.sites)
        x = image_to_tensor(Image.fromarray(scene.image), head.size, crop="none", resize=settings.resize)
        (view,) = run_plans(bb, [plan], [x])
        maps, probs, grid = head.attention(view)
        for k, word in enumerate(words):
            objects = [o for o in scene.objects if o.category == word]
            mask = np.isin(scene.instance, [o.instance for o in objects])
            out.append({"map": maps[k].reshape(-1), "probs": probs, "grid": grid, "size": (size, size),
                        "boxes": np.array([o.bbox for o in objects], np.float64), "mask": mask})
    return out


def score(data: list[dict], params: RefineSettings) -> dict:
    meter = WSOLMeter()
    for d in data:
        x = refine(d["map"][None], d["probs"], d["grid"], params).reshape(1, 1, *d["grid"])
        heat = F.interpolate(x, size=d["size"], mode="bilinear", align_corners=False)[0, 0].numpy()
        meter.update(heat, d["boxes"], d["mask"])
    return meter.result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="scenes per split (val and test)")
    ap.add_argument("--model", default=None, help="diffusers directory (default: the packaged diffprobe-mini)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--divisors", type=int, nargs="+", default=None,
                    help="the attention levels read, by resolution divisor (localize.divisors; default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start, load = time.time(), os.getloadavg()[0]
    bb = load_backbone({"name": "mini", "path": str(args.model or packaged_path())})
    data = {split: scene_words(split, args.n, bb, divisors=args.divisors) for split in ("val", "test")}
    sweep = {m: [(kw, score(data["val"], RefineSettings(method=m.split(",")[0], **kw))) for kw in grid]
             for m, grid in GRID.items()}
    chosen = {m: max(rows, key=lambda r: r[1]["max_box_acc_v2"]) for m, rows in sweep.items()}
    test = {m: score(data["test"], RefineSettings(method=m.split(",")[0], **kw)) for m, (kw, _) in chosen.items()}
    print(f"\nLocalisation on {args.n} world val + {args.n} test scenes ({len(data['val'])} / {len(data['test'])} "
          f"words), model {args.model or 'diffprobe-mini'}, levels "
          f"{'all' if args.divisors is None else 'at divisors ' + str(args.divisors)}, {time.time() - start:.0f} s, "
          f"load average at start {load:.1f}\n")
    print("| method | settings (best on val) | val MaxBoxAccV2 | val mask threshold | test GT-known Loc (%) | "
          "test MaxBoxAccV2 (%) | @0.3 | @0.5 | @0.7 | test PxAP (%) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, (kw, val) in chosen.items():
        r = test[m]
        setting = ", ".join(f"{k} {v}" for k, v in kw.items()) or "-"
        print(f"| {m} | {setting} | {val['max_box_acc_v2']:.1f} | {val['gt_known_threshold']:.2f} | "
              f"{r['gt_known_loc']:.1f} | {r['max_box_acc_v2']:.1f} | {r['max_box_acc@0.3']:.1f} | "
              f"{r['max_box_acc@0.5']:.1f} | {r['max_box_acc@0.7']:.1f} | {r['pxap']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "sweep_val": sweep, "chosen": chosen, "test": test,
                                               "seconds": time.time() - start, "load_at_start": load}, indent=2))


if __name__ == "__main__":
    main()
