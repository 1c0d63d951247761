"""Attention quality of diffprobe-mini on the world's test split, against an untrained control.

    python benchmarks/mini_quality.py [--model DIR] [--also NAME=DIR ...] [--n 64] [--timesteps 100 300]
                                      [--noised] [--json out.json]

For each model and timestep: one UNet call per image (clean latent, only the timestep embedding says
t, as DiffSeg does; with --noised also the latent noised to t) conditioned on the scene's caption;
attention captured through diffprobe.hooks, heads averaged, sites of one resolution averaged. Rows
per attention resolution and "all" (every resolution upsampled to the image and averaged):
  self/unif   mean over objects of (self-attention mass on the query's own object) / (uniform's mass)
  cat peak    fraction of objects whose category word's cross-attention peak lies inside the object
  col peak    the same for the colour word
  chance      mean object area / image area (where a random peak lands)
The control has the same architecture, untrained UNet and text encoder, and the trained VAE; --also adds
other trained pipelines (e.g. an ablation trained without the grounding loss) as rows of the same table.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffprobe.backbones import Backbone, load_backbone  # noqa: E402
from diffprobe.data.world import render_scene, scene_seed  # noqa: E402
from diffprobe.hooks import BatchLayout, ProbeRegistry, Reduce  # noqa: E402
from diffprobe.mini import packaged_path  # noqa: E402
from diffprobe.mini.quality import grid_masks, own_object_ratios, peak_in_object  # noqa: E402
from diffprobe.runners import encode_images, encode_prompt, unet_step  # noqa: E402


def untrained_control(bb: Backbone, seed: int = 0) -> Backbone:
    """Same architecture, freshly initialised UNet and text encoder, the trained VAE and tokenizer."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(bb.unet.config).eval().requires_grad_(False)
    text = CLIPTextModel(bb.text_encoder.config).eval().requires_grad_(False)
    return Backbone(unet=unet, vae=bb.vae, text_encoder=text, tokenizer=bb.tokenizer, scheduler=bb.scheduler,
                    kind=bb.kind, name="untrained")


def token_positions(bb: Backbone, scene) -> list[tuple[int, int]]:
    """(category token, colour token) per object; checks each caption word is one token after BOS."""
    ids = bb.tokenizer(scene.caption).input_ids
    words = scene.caption.split()
    out = []
    for obj, w in zip(scene.objects, scene.words):
        for key in ("category", "colour"):
            expect = bb.tokenizer.convert_tokens_to_ids(words[w[key]] + "</w>")
            assert ids[w[key] + 1] == expect, f"word {words[w[key]]!r} is not one token"
        out.append((w["category"] + 1, w["colour"] + 1))
    return out


@torch.no_grad()
def evaluate(bb: Backbone, scenes, timestep: int, noised: bool) -> dict[str, dict[str, float]]:
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = encode_images(bb, images)
    cond = encode_prompt(bb, [s.caption for s in scenes])
    probe = ProbeRegistry(bb.unet)
    with probe.capture("*.attn[12].hook_probs", reduce=Reduce(heads="mean"), layout=BatchLayout(cfg=False)) as cache:
        unet_step(bb, latents, timestep, cond, noise="random" if noised else None,
                  generator=torch.Generator().manual_seed(0))
    groups: dict[tuple[str, tuple[int, int]], list[torch.Tensor]] = defaultdict(list)
    for name in cache.names:
        groups[(probe.sites[name].kind, cache.grid(name))].append(cache[name])
    size = scenes[0].image.shape[:2]
    rows: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    all_maps = []
    for (kind, grid), tensors in sorted(groups.items(), key=lambda kv: -kv[0][1][0]):
        probs = torch.stack(tensors).mean(0)  # (B, Q, K)
        row = rows[f"{grid[0]}x{grid[1]}"]
        if kind == "self_attn":
            for b, s in enumerate(scenes):
                ids = [o.instance for o in s.objects]
                row["self/unif"] += own_object_ratios(probs[b], grid_masks(s.instance, ids, grid))
        else:
            all_maps.append(torch.nn.functional.interpolate(
                probs.transpose(1, 2).reshape(len(scenes), -1, *grid), size=size, mode="bilinear",
                align_corners=False).flatten(2).transpose(1, 2))
            _peaks(row, probs, grid, scenes, bb)
    _peaks(rows["all"], torch.stack(all_maps).mean(0), size, scenes, bb)
    return {res: {k: float(np.mean(v)) for k, v in r.items()} for res, r in rows.items()}


def _peaks(row, probs: torch.Tensor, grid, scenes, bb) -> None:
    for b, s in enumerate(scenes):
        for obj, (cat_tok, col_tok) in zip(s.objects, token_positions(bb, s)):
            mask = s.instance == obj.instance
            row["cat peak"].append(peak_in_object(probs[b, :, cat_tok], grid, mask))
            row["col peak"].append(peak_in_object(probs[b, :, col_tok], grid, mask))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="diffusers directory (default: the packaged diffprobe-mini)")
    ap.add_argument("--also", nargs="*", default=[], metavar="NAME=DIR", help="more pipelines to score")
    ap.add_argument("--n", type=int, default=64, help="test-split scenes")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--noised", action="store_true", help="also rows with the latent noised to t (seed 0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    bb = load_backbone({"name": "mini", "path": str(args.model or packaged_path())})
    models = {"trained": bb}
    for spec in args.also:
        name, sep, path = spec.partition("=")
        if not sep:
            ap.error(f"--also takes NAME=DIR, got {spec!r}")
        models[name] = load_backbone({"name": "mini", "path": path})
    models["untrained"] = untrained_control(bb)
    scenes = [render_scene(scene_seed("test", i), bb.sample_size) for i in range(args.n)]
    chance = float(np.mean([o.area / s.instance.size for s in scenes for o in s.objects]))
    n_obj = sum(len(s.objects) for s in scenes)
    settings = [(t, False) for t in args.timesteps] + ([(t, True) for t in args.timesteps] if args.noised else [])
    results = {m: {f"{t}{' noised' if nz else ''}": evaluate(b, scenes, t, nz) for t, nz in settings}
               for m, b in models.items()}
    print(f"diffprobe-mini attention quality: {args.n} world test scenes, {n_obj} objects, "
          f"chance of a peak in the object {chance:.3f}; torch threads {args.threads}")
    print("| model | t | attention grid | self/unif | cat peak | col peak |")
    print("|---|---|---|---|---|---|")
    for m, per_t in results.items():
        for t, per_res in per_t.items():
            for res, r in per_res.items():
                cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("self/unif", "cat peak", "col peak")]
                print(f"| {m} | {t} | {res} | " + " | ".join(cells) + " |")
    print("\nbest setting per model (targets: self/unif >= 5, cat peak >= 0.70):")
    for m, per_t in results.items():
        best = {k: max(((r[k], f"t={t}, {res}") for t, per_res in per_t.items() for res, r in per_res.items()
                        if k in r), default=(float("nan"), "-")) for k in ("self/unif", "cat peak", "col peak")}
        print(f"- {m}: " + "; ".join(f"{k} {v:.2f} ({where})" for k, (v, where) in best.items()))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wall {time.time() - start:.1f} s, peak RSS {peak_mb:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "objects": n_obj, "chance": chance,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
