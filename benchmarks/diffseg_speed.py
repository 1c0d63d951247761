"""DiffSeg post-processing speed and memory: diffprobe's head vs a straightforward implementation of the
reference algorithm, on the same captured attention tensors, plus the UNet call that produces them.

    python benchmarks/diffseg_speed.py [--sides 64 32 16] [--threads 1] [--straight-chunk 4]

The UNet is SD 1.5's architecture (the sd1 family's published config, the published config)
with random weights: no download. Its call is timed at 512 px (latent 64), plain and under the capture
of all self-attention sites (heads averaged). Two workloads of attention tensors per finest side S in
--sides (grids S, S/2, S/4, S/8 with 5, 5, 5, 1 layers, as SD 1.5 at 8S px):
- "captured": what that UNet returns for a random latent of side S. With random weights the maps are
  nearly uniform, so everything merges into one segment;
- "planted": a 12-region Voronoi segmentation, each query attending to its region with noise
  (diffprobe.heads.diffseg.planted), so merging and NMS handle about a dozen segments.
Both implementations segment the same tensors (tau, 16x16 anchors, 3 iterations, NMS at 8S px):

- straightforward: the reference's steps literally, in float64: the (S, S, S, S) aggregated tensor,
  iteration-0 KL by broadcasting anchors against all S^2 maps ((c, S^2, S, S) per chunk of c anchors;
  the reference uses c = 16, i.e. 2 GiB per float64 intermediate at S = 64; here --straight-chunk),
  the greedy merge with broadcast KL, bilinear upsampling and argmax;
- diffprobe: heads.diffseg.segment (float32 matrix-form KL in chunks), merge "reference" (same
  semantics as the straightforward one, to compare labels) and "components" (the default).

Every measurement runs in a forked child process; peak memory is the child's peak resident set above
its resident set at the start. Timings are one run each (no repetition); the table says so.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the planted maps, the literal baseline

from diffseg_literal import straightforward  # noqa: E402
from diffseg_planted import planted_attention, voronoi_segmentation  # noqa: E402

from diffprobe.heads.diffseg import SegmentSettings, segment  # noqa: E402
from diffprobe.heads.diffseg.sites import attention_groups, maps_by_grid  # noqa: E402
from diffprobe.hooks import ProbeRegistry, Reduce  # noqa: E402
from diffprobe.io import load_tensors, save_tensors  # noqa: E402

def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measured(fn, *args):
    """Run fn(*args) in a forked child; returns (result, seconds, peak MiB above the child's start).

    fn returns a tensor or a {(h, w): tensor} dict; it comes back through a safetensors file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.safetensors"
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                start_rss = rss_mib()
                t0 = time.perf_counter()
                out = fn(*args)
                seconds = time.perf_counter() - t0
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start_rss
                tensors = {f"{k[0]}x{k[1]}": v for k, v in out.items()} if isinstance(out, dict) else {"out": out}
                save_tensors(path, tensors, metadata={"seconds": repr(seconds), "peak": repr(peak)})
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status:
            raise RuntimeError(f"measurement of {fn.__name__} failed in the child process")
        tensors, meta = load_tensors(path)
    if "out" in tensors:
        out = tensors["out"]
    else:
        out = {tuple(int(v) for v in k.split("x")): t for k, t in tensors.items()}
    return out, float(meta["seconds"]), float(meta["peak"])


# -- diffprobe -------------------------------------------------------------------------------------------------


def fast(maps_by_grid, side, tau, points, merge, out_px):
    params = SegmentSettings(tau=tau, iterations=3, anchors=points, merge=merge)
    return segment(maps_by_grid, size=(out_px, out_px), params=params).labels


def unet_call(unet, latents, context, names):
    with torch.no_grad():
        if names is None:
            return unet(latents, 300, encoder_hidden_states=context).sample
        probe = ProbeRegistry(unet)
        with probe.capture(names, reduce=Reduce(heads="mean")) as cache:
            unet(latents, 300, encoder_hidden_states=context)
        return maps_by_grid(cache, attention_groups(probe.sites))


def same_up_to_permutation(a, b) -> float:
    """Fraction of pixels on which label maps a and b agree after matching labels greedily by overlap."""
    pairs, counts = torch.unique(torch.stack([a.flatten(), b.flatten()]), dim=1, return_counts=True)
    best = {}
    for (x, y), n in zip(pairs.T.tolist(), counts.tolist()):
        if n > best.get(x, (0, None))[0]:
            best[x] = (n, y)
    return sum(n for n, _ in best.values()) / a.numel()


def planted(side: int) -> dict:
    seg = voronoi_segmentation(side, regions=12, seed=0)
    return {(s, s): planted_attention(seg, s, layers=n, noise=0.5, seed=s)
            for s, n in ((side, 5), (side // 2, 5), (side // 4, 5), (side // 8, 1))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", type=int, nargs="+", default=[64, 32, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--straight-chunk", type=int, default=4, help="anchors per broadcast chunk (reference: 16)")
    ap.add_argument("--tau", type=float, default=1.1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    from diffprobe.loading import family_of_structure

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**family_of_structure("sd15").configs["sd15"]).eval()
    names = ProbeRegistry(unet).select(lambda s: s.kind == "self_attn")
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    print(f"torch threads={args.threads}; one run per cell (no repeats); SD 1.5 UNet with random weights, "
          f"{len(names)} self-attention sites; straightforward chunk={args.straight_chunk} anchors", flush=True)
    latent512 = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    _, t_unet, m_unet = measured(unet_call, unet, latent512, context, None)
    _, t_cap, m_cap = measured(unet_call, unet, latent512, context, names)
    print(f"UNet call at 512 px: {t_unet:.2f} s ({m_unet:.0f} MiB); with self-attention capture: "
          f"{t_cap:.2f} s ({m_cap:.0f} MiB)", flush=True)
    rows = []
    for side in args.sides:
        latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(side))
        captured = unet_call(unet, latents, context, names)
        for workload, maps in (("captured", captured), ("planted", planted(side))):
            out_px, points = 8 * side, min(16, side)
            straight, t_str, m_str = measured(straightforward, maps, side, args.tau, points, args.straight_chunk,
                                              out_px)
            ref, t_ref, m_ref = measured(fast, maps, side, args.tau, points, "reference", out_px)
            comp, t_comp, m_comp = measured(fast, maps, side, args.tau, points, "components", out_px)
            rows.append(dict(side=side, px=out_px, workload=workload, straight=t_str, straight_mib=m_str, ref=t_ref,
                             ref_mib=m_ref, comp=t_comp, comp_mib=m_comp, agree=same_up_to_permutation(straight, ref),
                             segments=f"{int(straight.max()) + 1} / {int(ref.max()) + 1} / {int(comp.max()) + 1}"))
            print(rows[-1], flush=True)
    print()
    print(f"UNet call (SD 1.5, 512 px, random weights): {t_unet:.2f} s, peak +{m_unet:.0f} MiB; "
          f"with the capture of {len(names)} self-attention sites: {t_cap:.2f} s, peak +{m_cap:.0f} MiB")
    print()
    print("| S (NMS px) | tensors | straightforward f64 s (MiB) | diffprobe, reference merge s (MiB) | "
          "diffprobe, components s (MiB) | speed-up (reference merge) | components / UNet call | "
          "labels agree | segments (straight / ref / comp) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} ({r['px']}) | {r['workload']} | {r['straight']:.2f} ({r['straight_mib']:.0f}) | "
              f"{r['ref']:.3f} ({r['ref_mib']:.0f}) | {r['comp']:.3f} ({r['comp_mib']:.0f}) | "
              f"{r['straight'] / r['ref']:.0f}x | {100 * r['comp'] / t_unet:.1f} % | {100 * r['agree']:.2f} % | "
              f"{r['segments']} |")


if __name__ == "__main__":
    main()
