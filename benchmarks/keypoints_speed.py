"""Keypoints head speed and memory on CPU: optimisation iterations/s and predict time per image.

    python benchmarks/keypoints_speed.py                 # tiny and SD 1.5 architecture (random weights)
    python benchmarks/keypoints_speed.py --models tiny   # quick

Each case runs in its own subprocess so its peak resident memory (ru_maxrss) is its own. Settings are
the reference's: 500 tokens, maps at 128 x 128, batch of x and T(x) per iteration; predict with 10
augmentations batched (one UNet call of 10) vs unbatched (10 calls of 1), measured in the same run.
SD 1.5 = UNet2DConditionModel(**SD 1.5 config) with random weights at 512 px (no download); the VAE is
the tiny test VAE in every case (it is outside what is measured: the UNet passes and the head).
torch.set_num_threads(1) throughout (the machine is shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

import torch


def backbone(name: str):
    from diffprobe.loading import build_denoiser
    from diffprobe.loading import tiny_backbone

    bb = tiny_backbone("sd15")
    if name == "sd15":
        unet = build_denoiser("sd15").eval().requires_grad_(False)
        bb = dataclasses.replace(bb, unet=unet, name="sd15-random")
    return bb


def case(model: str, what: str, iterations: int) -> dict:
    from diffprobe.training.keypoints import FitSettings, initial_embeddings, iteration_loss
    from diffprobe.heads.keypoints.maps import MapSettings, default_sites
    from diffprobe.heads.keypoints.predict import KeypointPredictHead, PredictSettings, ensemble
    from diffprobe.runner import run_heads
    from diffprobe.training.keypoints import attention_maps
    from diffprobe.heads.keypoints.state import KeypointModel

    torch.set_num_threads(1)
    bb = backbone(model)
    spec = MapSettings(tuple(default_sites(bb.probe.sites)), res=128)
    size = 64 if model == "tiny" else 512
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = FitSettings()
    emb = initial_embeddings(cfg, bb.context_dim)
    if what == "fit":
        emb.requires_grad_(True)
        times = []
        for i in range(iterations + 1):                  # the first iteration is a warm-up
            t0 = time.perf_counter()
            loss, _ = iteration_loss(bb, spec, cfg, image, emb, torch.Generator().manual_seed(i))
            loss.backward()
            times.append(time.perf_counter() - t0)
        sec = sum(times[1:]) / iterations
        out = {"sec_per_iteration": sec, "iterations_per_s": 1 / sec, "adam_steps_per_s": 1 / (sec * cfg.batch_size)}
    else:
        model_state = KeypointModel(emb, torch.arange(10))
        head = KeypointPredictHead(spec, model_state, PredictSettings(augmentations=10), size)

        def predict():
            if what == "predict_batched":                # the head: the 10 views in one batch
                return run_heads(bb, [head], image)
            views = head.inputs(image)                   # baseline: one denoiser call per view
            with torch.no_grad():
                maps = torch.cat([attention_maps(bb, spec, views[i:i + 1], emb, tokens=model_state.indices)
                                  for i in range(len(views))])
            return ensemble(maps, head.cfg.transforms()[0], (size, size))

        run_heads(bb, [KeypointPredictHead(spec, model_state, PredictSettings(augmentations=2), size)], image)  # warm-up
        t0 = time.perf_counter()
        for _ in range(iterations):
            predict()
        out = {"sec_per_image": (time.perf_counter() - t0) / iterations}
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,sd15")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--case", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(*args.case, args.iterations)))
        return
    rows = []
    for model in args.models.split(","):
        res = {}
        for what in ("fit", "predict_unbatched", "predict_batched"):
            n = args.iterations if model == "tiny" else 1
            proc = subprocess.run([sys.executable, __file__, "--case", model, what, "--iterations", str(n)],
                                  capture_output=True, text=True, check=True)
            res[what] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"# {model} {what}: {res[what]}", flush=True)
        rows.append((model, res))
    print("\n| model (CPU, 1 thread) | iterations/s | Adam steps/s (x4 accumulation) | fit peak RSS MiB | "
          "predict 10 aug unbatched s/img | batched s/img | batched speed-up | predict peak RSS MiB (batched) |")
    print("|---|---|---|---|---|---|---|---|")
    for model, r in rows:
        f, u, b = r["fit"], r["predict_unbatched"], r["predict_batched"]
        print(f"| {model} | {f['iterations_per_s']:.3g} | {f['adam_steps_per_s']:.3g} | {f['peak_rss_mib']:.0f} | "
              f"{u['sec_per_image']:.3g} | {b['sec_per_image']:.3g} | {u['sec_per_image'] / b['sec_per_image']:.2f}x | "
              f"{b['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
