"""DiffSeg on the procedural world with diffprobe-mini: tau chosen on the val split, reported on test, beside
the baselines a skeptic tries first, all in one run on the same scenes.

    python benchmarks/diffseg_world.py [--n 200] [--model DIR [--parts-from DIR]] [--json out.json] [--resize-check 256]
        [--divisors 2 4 8]

Every scene's self-attention is captured once (one UNet call: clean latent, t=300, empty prompt), then the
head runs for each merge mode and tau, and the normalised cut (method=ncut) for each affinity and cut
threshold; the best of each on val is also reported with PAMR refinement. Labels are the world's exact class
maps as COCO-Stuff-27 classes (the mapping `task=world world.format=coco_stuff` writes); scores use per-image
Hungarian matching (the DiffSeg reference's protocol). Baselines: one segment, top/bottom halves, and k-means
on pixel colour with k = the number of classes present in the image (told the true count: a strong baseline on
these scenes).
--resize-check SIZE also renders the test scenes at SIZE px and segments them at the chosen tau after each
resize filter (the model sees its own sample size), to measure what the filter changes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffprobe.loading import load_backbone  # noqa: E402
from diffprobe.data.coco_stuff import CocoStuff27  # noqa: E402
from diffprobe.data.images import RESIZE_FILTERS, image_to_tensor  # noqa: E402
from diffprobe.data.world import render_scene, scene_seed  # noqa: E402
from diffprobe.data.world.export import coco_fine_labels  # noqa: E402
from diffprobe.eval.segmentation import PerImageHungarian  # noqa: E402
from diffprobe.eval.segmentation_baselines import colour_kmeans, one_segment, top_bottom  # noqa: E402
from diffprobe.heads.diffseg import SegmentSettings, segment  # noqa: E402
from diffprobe.heads.diffseg.ncut import NcutSettings, ncut_segment  # noqa: E402
from diffprobe.heads.pamr import refine_labels  # noqa: E402
from diffprobe.mini import packaged_path  # noqa: E402
from diffprobe.heads.diffseg.head import DiffSegHead, DiffSegSettings  # noqa: E402
from diffprobe.runner import run_plans  # noqa: E402

TAUS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.7, 0.9, 1.1)
MODES = {  # name: SegmentSettings overrides
    "reference (float16 KL, default)": {"merge": "reference"},
    "reference, float32 KL": {"merge": "reference", "fp16_kl": False},
    "leaders": {"merge": "leaders"},
    "components": {"merge": "components"},
}

NCUT_TAUS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
NCUT = {  # name: NcutSettings overrides
    "attention rows, alpha 10 (DiffCut's affinity)": {"affinity": "attention_rows", "alpha": 10.0},
    "attention rows, alpha 3": {"affinity": "attention_rows", "alpha": 3.0},
    "attention (P + P^T) / 2": {"affinity": "attention"},
}


def scene_data(split: str, n: int, bb, head: DiffSegHead, size: int = 64, resize: str = "bilinear_tf") -> list[dict]:
    """Per scene: the captured maps, the image and its COCO-Stuff-27 label map (scenes rendered at `size`)."""
    lut = CocoStuff27.lut
    out = []
    plan = head.plan(bb.probe.sites)
    for i in range(n):
        scene = render_scene(scene_seed(split, i), size)
        x = image_to_tensor(Image.fromarray(scene.image), head.size, crop="none", resize=resize)
        (view,) = run_plans(bb, [plan], [x])
        out.append({"maps": head.maps(view), "image": scene.image, "label": lut[coco_fine_labels(scene)].astype(np.int64)})
    return out


class Scores:
    """Per-image Hungarian scores and the mean segment count of one prediction rule."""

    def __init__(self):
        self.meter, self.segments = PerImageHungarian(27), []

    def add(self, label: np.ndarray, pred: np.ndarray) -> None:
        self.meter.update(label, pred)
        self.segments.append(len(np.unique(pred)))

    def row(self) -> dict:
        r = self.meter.result()
        return {"pixel_accuracy": 100 * r["pixel_accuracy"], "miou": 100 * r["miou"],
                "segments": float(np.mean(self.segments))}


def scores(data: list[dict], rule, pamr: bool = False) -> dict:
    """Scores of rule(maps, size) -> labels over the scenes, optionally refined by PAMR on the scene image."""
    s = Scores()
    for d in data:
        labels = rule(d["maps"], d["label"].shape)
        if pamr:
            labels = refine_labels(labels, torch.from_numpy(d["image"]).permute(2, 0, 1).float() / 255)
        s.add(d["label"], labels.numpy())
    return s.row()


def diffseg_scores(data: list[dict], params: SegmentSettings, pamr: bool = False) -> dict:
    return scores(data, lambda maps, size: segment(maps, size=size, params=params).labels, pamr)


def ncut_scores(data: list[dict], params: NcutSettings, pamr: bool = False) -> dict:
    return scores(data, lambda maps, size: ncut_segment(maps, size, params).labels, pamr)


def baseline_scores(data: list[dict]) -> dict[str, dict]:
    rows = {}
    rules = {
        "one segment": lambda d: one_segment(*d["label"].shape),
        "top / bottom halves": lambda d: top_bottom(*d["label"].shape),
        "k-means on pixel colour, k = true classes": lambda d: colour_kmeans(
            d["image"], len(np.unique(d["label"][d["label"] != 255])), seed=0),
    }
    for name, rule in rules.items():
        s = Scores()
        for d in data:
            s.add(d["label"], rule(d))
        rows[name] = s.row()
    return rows


def fmt(row: dict) -> str:
    return f"{row['segments']:.1f} | {row['pixel_accuracy']:.1f} | {row['miou']:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="scenes per split (val and test)")
    ap.add_argument("--model", default=None, help="diffusers directory (default: the packaged diffprobe-mini)")
    ap.add_argument("--parts-from", default=None, help="the directory of --model's VAE and text encoder (mini-dit: "
                                                       "the packaged mini)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--resize-check", type=int, default=None, metavar="SIZE")
    ap.add_argument("--divisors", type=int, nargs="+", default=None,
                    help="the self-attention levels read, by resolution divisor (diffseg.divisors; default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start, load = time.time(), os.getloadavg()[0]
    bb = load_backbone({"name": "mini", "path": str(args.model or packaged_path()), "parts_from": args.parts_from})
    head = DiffSegHead(DiffSegSettings(tau=0.2, divisors=args.divisors), bb.sample_size)
    data = {split: scene_data(split, args.n, bb, head) for split in ("val", "test")}
    sweep = {mode: {tau: diffseg_scores(data["val"], SegmentSettings(tau=tau, **kw)) for tau in TAUS}
             for mode, kw in MODES.items()}
    chosen = {mode: max(TAUS, key=lambda t: rows[t]["miou"]) for mode, rows in sweep.items()}
    test = {f"DiffSeg {mode}, tau {chosen[mode]} (best on val)": diffseg_scores(
        data["test"], SegmentSettings(tau=chosen[mode], **MODES[mode])) for mode in MODES}
    test["DiffSeg reference, tau 1.1 (the paper's COCO value)"] = diffseg_scores(
        data["test"], SegmentSettings(tau=1.1))
    ref = "reference (float16 KL, default)"
    test[f"DiffSeg {ref}, tau {chosen[ref]} + PAMR"] = diffseg_scores(
        data["test"], SegmentSettings(tau=chosen[ref], **MODES[ref]), pamr=True)
    ncut_sweep = {name: {tau: ncut_scores(data["val"], NcutSettings(tau=tau, **kw)) for tau in NCUT_TAUS}
                  for name, kw in NCUT.items()}
    ncut_chosen = {name: max(NCUT_TAUS, key=lambda t: rows[t]["miou"]) for name, rows in ncut_sweep.items()}
    for name, kw in NCUT.items():
        params = NcutSettings(tau=ncut_chosen[name], **kw)
        test[f"normalised cut, {name}, tau {ncut_chosen[name]} (best on val)"] = ncut_scores(data["test"], params)
    best = max(NCUT, key=lambda name: ncut_sweep[name][ncut_chosen[name]]["miou"])
    test[f"normalised cut, {best}, tau {ncut_chosen[best]} + PAMR"] = ncut_scores(
        data["test"], NcutSettings(tau=ncut_chosen[best], **NCUT[best]), pamr=True)
    baselines = {split: baseline_scores(data[split]) for split in ("val", "test")}

    print(f"\nDiffSeg on {args.n} world val + {args.n} test scenes, model {args.model or 'diffprobe-mini'}, "
          f"levels {'all' if args.divisors is None else 'at divisors ' + str(args.divisors)}, "
          f"{time.time() - start:.0f} s, load average at start {load:.1f}\n")
    print("Validation sweep (segments | pixel accuracy % | mIoU %, per-image Hungarian):\n")
    print("| tau | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for tau in TAUS:
        print(f"| {tau} | " + " | ".join(fmt(sweep[m][tau]) for m in MODES) + " |")
    for name, row in baselines["val"].items():
        print(f"| baseline: {name} | {fmt(row)} |")
    print("\nNormalised cut, validation sweep:\n\n| ncut_tau | " + " | ".join(NCUT) + " |")
    print("|---|" + "---|" * len(NCUT))
    for tau in NCUT_TAUS:
        print(f"| {tau} | " + " | ".join(fmt(ncut_sweep[m][tau]) for m in NCUT) + " |")
    print("\nTest split:\n\n| prediction | segments per image | pixel accuracy (%) | mIoU (%) |\n|---|---|---|---|")
    for name, row in baselines["test"].items():
        print(f"| baseline: {name} | {fmt(row)} |")
    for name, row in test.items():
        print(f"| {name} | {fmt(row)} |")
    resized = {}
    if args.resize_check:
        tau = chosen["reference (float16 KL, default)"]
        for name in RESIZE_FILTERS:
            resized[name] = diffseg_scores(scene_data("test", args.n, bb, head, args.resize_check, name),
                                           SegmentSettings(tau=tau))
        print(f"\nTest scenes rendered at {args.resize_check} px, resized to {head.size} px for the model, "
              f"DiffSeg reference at tau {tau}, labels at {args.resize_check} px:\n")
        print("| resize filter | segments per image | pixel accuracy (%) | mIoU (%) |\n|---|---|---|---|")
        for name, row in resized.items():
            print(f"| {name} | {fmt(row)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "sweep_val": sweep, "chosen_tau": chosen, "test": test,
                                               "ncut_sweep_val": ncut_sweep, "ncut_chosen_tau": ncut_chosen,
                                               "baselines": baselines, "resize_check": resized,
                                               "seconds": time.time() - start, "load_at_start": load}, indent=2))


if __name__ == "__main__":
    main()
