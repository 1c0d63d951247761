"""Keypoints head speed and memory on CPU: Adam steps/s and predict time per image.

    python benchmarks/keypoints_speed.py                 # tiny, mini and SD 1.5 architecture (random weights)
    python benchmarks/keypoints_speed.py --models mini,mini_dit --iterations 5   # the world's models
    python benchmarks/keypoints_speed.py --models tiny   # quick

Each case runs in its own subprocess so its peak resident memory (ru_maxrss) is its own. Settings are
the reference's: 500 tokens, maps at 128 x 128 (mini: its shipped sites at 32 x 32, as WorldBench), a batch of
x and T(x) per iteration, 4 iterations per Adam step; the step as the reference loops (4 denoiser calls) and with
`iterations_per_call=4` (one call of 8 images), and the loop with every chunk of attention probabilities
checkpointed and computed again in the backward (what a call above `KEEP_FOR_BACKWARD_BYTES` does; every call did
before 2026-12-07); predict with 10 augmentations batched (one UNet call of 10) vs unbatched (10 calls of 1). Each
pair measured in the same run.
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

    if name in ("mini", "mini_dit"):
        from importlib.resources import files

        from omegaconf import OmegaConf

        from diffprobe.loading import load_backbone

        return load_backbone(OmegaConf.load(str(files("diffprobe.conf") / "model" / f"{name}.yaml")))
    bb = tiny_backbone("sd15")
    if name == "sd15":
        unet = build_denoiser("sd15").eval().requires_grad_(False)
        bb = dataclasses.replace(bb, unet=unet, name="sd15-random")
    return bb


def case(model: str, what: str, iterations: int) -> dict:
    from diffprobe.training.keypoints import FitSettings, initial_embeddings, iteration_losses
    from diffprobe.heads.keypoints.maps import MapSettings, default_sites
    from diffprobe.heads.keypoints.predict import KeypointPredictHead, PredictSettings, ensemble
    from diffprobe.runner import run_heads
    from diffprobe.training.keypoints import attention_maps
    from diffprobe.heads.keypoints.state import KeypointModel

    torch.set_num_threads(1)
    bb = backbone(model)
    spec = MapSettings(tuple(default_sites(bb.probe.sites)), res=128)
    if model == "mini":
        from omegaconf import OmegaConf
        from importlib.resources import files

        spec = MapSettings(tuple(OmegaConf.load(str(files("diffprobe.conf") / "model" / "mini.yaml")).keypoints_sites),
                           res=32)
    if model == "mini_dit":
        spec = MapSettings(spec.sites, res=32)
    size = bb.check_image_size(None) if model.startswith("mini") else {"tiny": 64}.get(model, 512)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = FitSettings()
    emb = initial_embeddings(cfg, bb.context_dim)
    if what.startswith("fit"):
        if what == "fit_recomputed":   # every chunk's probabilities checkpointed and computed again in the backward
            from diffprobe.hooks import attention

            attention.KEEP_FOR_BACKWARD_BYTES = 0
        emb.requires_grad_(True)
        per_call = cfg.batch_size if what == "fit_shared" else 1
        times = []
        for step in range(iterations + 1):               # the first step is a warm-up
            t0 = time.perf_counter()
            for first in range(0, cfg.batch_size, per_call):
                seeds = range(step * cfg.batch_size + first, step * cfg.batch_size + first + per_call)
                loss, _ = iteration_losses(bb, spec, cfg, [image] * per_call, emb,
                                           [torch.Generator().manual_seed(i) for i in seeds])
                loss.backward()
            times.append(time.perf_counter() - t0)
        sec = sum(times[1:]) / iterations
        out = {"sec_per_step": sec, "adam_steps_per_s": 1 / sec}
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
    ap.add_argument("--models", default="tiny,mini,sd15")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--case", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(*args.case, args.iterations)))
        return
    rows = []
    for model in args.models.split(","):
        res = {}
        for what in ("fit", "fit_shared", "fit_recomputed", "predict_unbatched", "predict_batched"):
            n = 1 if model == "sd15" else args.iterations
            proc = subprocess.run([sys.executable, __file__, "--case", model, what, "--iterations", str(n)],
                                  capture_output=True, text=True, check=True)
            res[what] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"# {model} {what}: {res[what]}", flush=True)
        rows.append((model, res))
    print("\n| model (CPU, 1 thread) | s per Adam step (4 iterations, reference loop) | one call of 4 | speed-up | "
          "loop, probabilities recomputed in the backward | loop: recomputed / kept | "
          "fit peak RSS MiB (loop / one call / loop recomputed) | predict 10 aug unbatched s/img | batched s/img | "
          "batched speed-up | predict peak RSS MiB (batched) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, r in rows:
        f, g, c, u, b = r["fit"], r["fit_shared"], r["fit_recomputed"], r["predict_unbatched"], r["predict_batched"]
        print(f"| {model} | {f['sec_per_step']:.3g} | {g['sec_per_step']:.3g} | "
              f"{f['sec_per_step'] / g['sec_per_step']:.2f}x | {c['sec_per_step']:.3g} | "
              f"{c['sec_per_step'] / f['sec_per_step']:.2f}x | "
              f"{f['peak_rss_mib']:.0f} / {g['peak_rss_mib']:.0f} / {c['peak_rss_mib']:.0f} | "
              f"{u['sec_per_image']:.3g} | {b['sec_per_image']:.3g} | {u['sec_per_image'] / b['sec_per_image']:.2f}x | "
              f"{b['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
