"""Interventions on the world: does attention mass predict causal effect, and does Prompt-to-Prompt's reweighting do
what it says?

1. Causal localisation (mini and mini-dit; world scenes of val, test and fresh): one noisy call (t = 300) on each
   scene under its caption; then the same call with a word's token columns ablated (Scale factor 0) at every
   cross-attention site. The change of the predicted noise |e' - e| (mean over latent channels) inside the word's
   objects' exact masks against outside them, beside the same ratio of the word's raw cross-attention (heads and
   sites averaged), and their per-pixel Pearson correlation.
2. Reweighting (mini): test-scene captions generated (20 steps, guidance 7.5, one seed per caption) with the first
   colour word's columns scaled by -1, 0, 0.5, 1, 2, 4 and 8 at every cross-attention site, conditional rows only, in the
   first 80 % of the steps (Prompt-to-Prompt's reweight window); scored in the world's own terms: the share of
   pixels within RGB distance 60 of that colour's palette value.

    python benchmarks/interventions_world.py [--n 60] [--prompts 30]

Writes benchmarks/results/interventions_world.json and prints the tables for docs/interventions.md.
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
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from config_helpers import make_cfg  # noqa: E402
from diffprobe.config import load_configured_backbone  # noqa: E402
from diffprobe.data.images import image_to_tensor  # noqa: E402
from diffprobe.data.world.vocab import COLOURS  # noqa: E402
from diffprobe.drives import encode_images, encode_prompt, generate, unet_call  # noqa: E402
from diffprobe.hooks import Need, Reduce  # noqa: E402
from diffprobe.hooks.edits import Scale  # noqa: E402
from worldbench import SPLITS, scenes  # noqa: E402

T = 300
FACTORS = (-1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
STEPS = 20
NEAR = 60.0


def cross_sites(bb) -> list[str]:
    return [n for n, s in bb.probe.sites.items() if s.kind == "cross_attn"]


def to_grid(m: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def causal_rows(bb, scene, seed: int) -> list[dict]:
    """Per category of the scene: inside / outside ratios of the causal change and of the attention, and their
    correlation, on the latent grid."""
    x = image_to_tensor(Image.fromarray(scene.image), bb.sample_size * bb.vae_factor, crop="none")
    latents = encode_images(bb, x)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    noisy = bb.family.noisy_latents(bb, latents, noise, T)
    cond = encode_prompt(bb, [scene.caption])
    sites = cross_sites(bb)
    with torch.no_grad(), bb.probe.capture(Need(tuple(sites), Reduce(heads="mean"))) as cache:
        eps = unet_call(bb, noisy, T, cond)
    grid = tuple(latents.shape[-2:])
    rows = []
    for word in sorted({o.category for o in scene.objects}):
        cols = bb.word_positions(scene.caption, [word])[0]
        with torch.no_grad(), bb.probe.intervene({s: Scale(columns=tuple(cols), factor=0.0) for s in sites}):
            ablated = unet_call(bb, noisy, T, cond)
        change = (ablated - eps).abs().mean(1)[0]                                       # (h, w)
        attention = torch.stack([to_grid(cache[s][0][:, cols].sum(-1).reshape(cache.grid(s)), grid)
                                 for s in sites]).mean(0)
        objects = [o.instance for o in scene.objects if o.category == word]
        mask = torch.from_numpy(np.isin(scene.instance, objects).astype(np.float32))
        share = to_grid(mask, grid)                                                     # object's share of a cell
        inside, outside = share > 0.5, share < 0.05
        if not inside.any() or not outside.any():
            continue

        def ratio(m):
            return float(m[inside].mean() / m[outside].mean().clamp(min=1e-12))
        corr = float(torch.corrcoef(torch.stack([change.flatten(), attention.flatten()]))[0, 1])
        rows.append({"word": word, "causal": ratio(change), "attention": ratio(attention), "corr": corr})
    return rows


def causal_table(model: str, n: int) -> dict:
    bb = load_configured_backbone(make_cfg("localize", model=model))
    out = {}
    for split in SPLITS:
        rows = [r for i, s in enumerate(scenes(split, n, bb.sample_size * bb.vae_factor))
                for r in causal_rows(bb, s, i)]
        by = {}
        for r in rows:
            by.setdefault(r["word"], []).append(r)
        by["all"] = rows

        def summary(rs):
            c, a = np.array([r["causal"] for r in rs]), np.array([r["attention"] for r in rs])
            return {"words": len(rs), "causal_median": float(np.median(c)), "attention_median": float(np.median(a)),
                    "causal_above_1": float((c > 1).mean() * 100), "corr_mean": float(np.mean([r["corr"] for r in rs])),
                    "rank_agreement": float(np.corrcoef(np.argsort(np.argsort(c)), np.argsort(np.argsort(a)))[0, 1])
                    if len(rs) > 2 else float("nan")}
        out[split] = {w: summary(rs) for w, rs in by.items()}
        print(f"  {model} {split}: {out[split]['all']}", file=sys.stderr, flush=True)
    return out


def colour_share(image: torch.Tensor, colour: str) -> float:
    rgb = torch.tensor(COLOURS[colour], dtype=torch.float32)
    pixels = image.permute(1, 2, 0).reshape(-1, 3) * 255
    return float(((pixels - rgb).norm(dim=1) < NEAR).float().mean() * 100)


def reweight_table(prompts: int) -> dict:
    bb = load_configured_backbone(make_cfg("localize", model="mini"))
    sites = cross_sites(bb)
    window = tuple(range(int(0.8 * (STEPS + 1))))      # Prompt-to-Prompt: floor(0.8 * (T + 1)) steps
    captions = []
    for s in scenes("test", 4 * prompts, bb.sample_size * bb.vae_factor):
        colours = [w for w in s.caption.split() if w in COLOURS]
        if colours and len(captions) < prompts:
            captions.append((s.caption, colours[0]))
    shares = {f: [] for f in FACTORS}
    for i, (caption, colour) in enumerate(captions):
        cols = tuple(bb.word_positions(caption, [colour])[0])
        for f in FACTORS:
            edit = {s: Scale(columns=cols, factor=f, rows=(1, 2), steps=window) for s in sites}   # cond row only
            with bb.probe.intervene(edit):
                images, _ = generate(bb, [caption], num_steps=STEPS, generator=torch.Generator().manual_seed(i))
            shares[f].append(colour_share(images[0].float(), colour))
    table = {str(f): {"mean_share": float(np.mean(v)), "vs_factor_1": float(np.mean(np.array(v) -
                                                                                     np.array(shares[1.0])))}
             for f, v in shares.items()}
    print(f"  reweight: {table}", file=sys.stderr, flush=True)
    return {"prompts": len(captions), "table": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60, help="scenes per split")
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "interventions_world.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    began, load = time.time(), os.getloadavg()[0]
    results = {"causal": {m: causal_table(m, args.n) for m in ("mini", "mini_dit")},
               "reweight": reweight_table(args.prompts), "n": args.n, "t": T, "threads": args.threads}
    results |= {"minutes": (time.time() - began) / 60, "load_at_start": load, "load_at_end": os.getloadavg()[0]}
    args.results.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
