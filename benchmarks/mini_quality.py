"""Attention quality of diffprobe-mini on the world's test split, against an untrained control.

    python benchmarks/mini_quality.py [--model DIR] [--also NAME=DIR ...] [--n 64] [--timesteps 100 300]
                                      [--noised] [--closeup] [--json out.json]

For each model and timestep: one UNet call per image (clean latent, only the timestep embedding says
t, as DiffSeg does; with --noised also the latent noised to t) conditioned on the scene's caption;
attention captured through diffprobe.hooks, heads averaged, sites of one resolution averaged. Rows
per attention resolution and "all" (every resolution upsampled to the image and averaged):
  self/unif   mean over objects of (self-attention mass on the query's own object) / (uniform's mass)
  part/obj    mean over parts (eye, beak, roof, ...) of (share of the object's mass on the query's own part) /
              (the part's share of the object): 1 = the object is one blob; keypoints need parts apart
  cat peak    fraction of objects whose category word's cross-attention peak lies inside the object
  col peak    the same for the colour word
  part peak   close-ups: fraction of part words ("eye", "beak", "roof", ...) whose peak lies inside the part
              (a model whose tokenizer has no part words gets "-")
  chance      mean object area / image area (where a random peak lands)
With --closeup the scenes are close-ups (one large face, bird or house in turn, as the CelebA and CUB
layouts draw them) instead of ordinary scenes.
The control has the same architecture, untrained denoiser (and text encoder, where it was trained with it), and
the trained VAE; --also adds
other trained pipelines (e.g. an ablation trained without the grounding loss) as rows of the same table.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffprobe.loading import load_backbone  # noqa: E402
from diffprobe.data.world import render_scene, scene_seed  # noqa: E402
from diffprobe.data.world.vocab import PART_IDS  # noqa: E402
from diffprobe.mini import packaged_path  # noqa: E402
from diffprobe.mini.quality import score_attention, untrained_control  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="diffusers directory (default: the packaged diffprobe-mini)")
    ap.add_argument("--parts-from", default=None, help="the directory of --model's VAE and text encoder (mini-dit: "
                                                       "the packaged mini)")
    ap.add_argument("--also", nargs="*", default=[], metavar="NAME=DIR", help="more pipelines to score")
    ap.add_argument("--n", type=int, default=64, help="test-split scenes")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--noised", action="store_true", help="also rows with the latent noised to t (seed 0)")
    ap.add_argument("--closeup", action="store_true", help="close-ups of one face, bird or house in turn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    bb = load_backbone({"name": "mini", "path": str(args.model or packaged_path()), "parts_from": args.parts_from})
    models = {"trained": bb}
    for spec in args.also:
        name, sep, path = spec.partition("=")
        if not sep:
            ap.error(f"--also takes NAME=DIR, got {spec!r}")
        models[name] = load_backbone({"name": "mini", "path": path})
    models["untrained"] = untrained_control(bb)
    figures = ("face", "bird", "house")
    scenes = [render_scene(scene_seed("test", i), bb.sample_size, first=figures[i % 3] if args.closeup else None,
                           closeup=args.closeup) for i in range(args.n)]
    chance = float(np.mean([o.area / s.instance.size for s in scenes for o in s.objects]))
    part_areas = [float((s.parts == PART_IDS[(s.objects[0].category, p)]).mean()) for s in scenes
                  for p in (s.words[0].get("parts", {}) if s.words else {})]
    n_obj = sum(len(s.objects) for s in scenes)
    settings = [(t, False) for t in args.timesteps] + ([(t, True) for t in args.timesteps] if args.noised else [])
    results = {m: {f"{t}{' noised' if nz else ''}": score_attention(b, scenes, t, nz) for t, nz in settings}
               for m, b in models.items()}
    kind = "close-ups" if args.closeup else "scenes"
    print(f"diffprobe-mini attention quality: {args.n} world test {kind}, {n_obj} objects, "
          f"chance of a peak in the object {chance:.3f}" + (f", in a named part {np.mean(part_areas):.3f}" if part_areas
                                                             else "") + f"; torch threads {args.threads}")
    keys = ("self/unif", "part/obj", "cat peak", "col peak", "part peak")
    print("| model | t | attention grid | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for m, per_t in results.items():
        for t, per_res in per_t.items():
            for res, r in per_res.items():
                cells = [f"{r[k]:.2f}" if k in r else "-" for k in keys]
                print(f"| {m} | {t} | {res} | " + " | ".join(cells) + " |")
    print("\nbest setting per model (targets: self/unif >= 5, cat peak >= 0.70):")
    for m, per_t in results.items():
        best = {k: max(((r[k], f"t={t}, {res}") for t, per_res in per_t.items() for res, r in per_res.items()
                        if k in r), default=(float("nan"), "-"))
                for k in keys}
        print(f"- {m}: " + "; ".join(f"{k} {v:.2f} ({where})" for k, (v, where) in best.items()))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wall {time.time() - start:.1f} s, peak RSS {peak_mb:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "objects": n_obj, "chance": chance,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
