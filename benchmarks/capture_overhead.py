"""Cost of capturing attention with diffprobe.hooks on the SD 1.5 UNet architecture, or on the SD3 / FLUX
transformer architectures at their published widths with fewer blocks (random weights, CPU).

For latents of 32x32 and 64x64 (256 and 512 px images) it times, in one process with the modes interleaved:
  bare   -- the denoiser forward with no hooks;
  cross  -- capturing every cross-attention map (UNet: the 16 attn2 maps; transformers: the image-to-text
            block of every joint attention), heads averaged ("cross, heads kept": every head, task=heatmap's);
  all    -- capturing every attention map (UNet: all 32, the 64x64 self-attention included; transformers:
            every whole joint map over image and text tokens), heads averaged;
each capture in both attention modes (recompute: the model keeps its fused attention and the probabilities
are recomputed; reuse: each captured layer's SDPA call is answered by an explicit query-chunked attention
whose probabilities are kept); and edits by probe.intervene (EDITS: two key columns of every cross-attention or
every attention map scaled by 2, or by 1: the identity, which must leave the output bit-identical); and reports each
as a ratio of process CPU time to bare (robust to other jobs
on a shared machine), with the bytes the cache holds and the peak RSS during one call in a fresh process,
above the RSS of the loaded model. Per-block costs are equal in a transformer, so fewer blocks keep the ratios.

    python benchmarks/capture_overhead.py [--model sd15|sd3|flux] [--blocks N] [--sizes 32 64] [--reps 3]
                                          [--threads N] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

MODES = {"bare": (None, None), "cross": ("cross", "recompute"), "cross, heads kept": ("cross", "recompute"),
         "all": ("all", "recompute"),
         "cross, reuse": ("cross", "reuse"), "all, reuse": ("all", "reuse")}
EDITS = {"edit cross (x2)": ("cross", 2.0), "edit all (x2)": ("all", 2.0), "edit all (identity)": ("all", 1.0)}
"""probe.intervene: text columns 1 and 2 (self-attention: keys 1 and 2) of every selected map scaled by the factor."""
SELECT = {"sd15": {"cross": "*.attn2.hook_probs", "all": "*.hook_probs"},
          "sd3": {"cross": "*.hook_img2txt", "all": "*.attn.hook_probs"},
          "flux": {"cross": "*.hook_img2txt", "all": "*.attn.hook_probs"}}
ALL_MODES = [*MODES, *EDITS]
TEXT_TOKENS = {"sd15": 77, "sd3": 77 + 256, "flux": 512}   # the pipelines' default text lengths


def _setup(threads: int, model: str = "sd15", blocks: int | None = None, dtype: str = "float32"):
    """(denoiser, registry, inputs(size) -> forward kwargs) with random weights initialised in place, in `dtype`."""
    import diffusers
    import torch

    from diffprobe.loading import build_denoiser, family_of_structure
    from diffprobe.hooks import ProbeRegistry

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if model == "sd15":
        net = build_denoiser("sd15", device="meta")
    else:
        family = family_of_structure(model)
        config = dict(family.configs[model])
        if blocks is not None:   # the published widths with fewer blocks
            config.update(num_layers=blocks, **({"num_single_layers": blocks} if model == "flux" else {}))
        with torch.device("meta"):
            net = getattr(diffusers, family.denoiser_class)(**config)
    net = net.to_empty(device="cpu")
    for module in net.modules():  # default init in place: no second copy of the weights at any time
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    net.eval().requires_grad_(False)
    if dtype != "float32":
        net.to(getattr(torch, dtype))
    cfg, text = net.config, TEXT_TOKENS[model]

    def inputs(size: int) -> dict:
        return {k: v.to(getattr(torch, dtype)) if torch.is_tensor(v) and v.is_floating_point() else v
                for k, v in float_inputs(size).items()}

    def float_inputs(size: int) -> dict:
        g = torch.Generator().manual_seed(size)
        if model == "sd15":
            return {"sample": torch.randn(1, 4, size, size, generator=g), "timestep": 300,
                    "encoder_hidden_states": torch.randn(1, text, 768, generator=g)}
        common = {"encoder_hidden_states": torch.randn(1, text, cfg.joint_attention_dim, generator=g),
                  "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g)}
        if model == "sd3":
            return {"hidden_states": torch.randn(1, cfg.in_channels, size, size, generator=g),
                    "timestep": torch.tensor([300.0]), **common}
        side = size // 2   # FLUX packs 2x2 latent patches into one token
        ids = torch.zeros(side, side, 3)
        ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
        return {"hidden_states": torch.randn(1, side * side, cfg.in_channels, generator=g),
                "timestep": torch.tensor([0.3]), "guidance": torch.tensor([3.5]), "img_ids": ids.reshape(-1, 3),
                "txt_ids": torch.zeros(text, 3), **common}

    return net, ProbeRegistry(net), inputs


def _rss_mib() -> float:
    from diffprobe.memory import rss_bytes

    return rss_bytes() / 2**20


def _call(net, probe, model: str, mode: str, kwargs: dict):
    """One denoiser call in `mode`; returns (the bytes the capture cache holds, the model's output)."""
    import torch

    from diffprobe.hooks import Reduce

    from diffprobe.hooks.edits import Scale

    if mode in EDITS:
        selection, factor = EDITS[mode]
        with torch.no_grad(), probe.intervene({SELECT[model][selection]: Scale(columns=(1, 2), factor=factor)}):
            return 0, net(**kwargs).sample
    selection, attention = MODES[mode]
    with torch.no_grad():
        if selection is None:
            return 0, net(**kwargs).sample
        heads = "none" if mode == "cross, heads kept" else "mean"   # task=heatmap's capture keeps the heads
        with probe.capture(SELECT[model][selection], reduce=Reduce(heads=heads), attention=attention) as cache:
            out = net(**kwargs).sample
        return sum(cache[n].numel() * cache[n].element_size() for n in cache.names), out


class _PeakSampler:
    """Samples this process's RSS every millisecond in a thread; `peak` is the largest seen while running."""

    def __enter__(self):
        self.peak, self._stop = _rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def peak_memory(mode: str, size: int, threads: int, model: str, blocks: int | None, dtype: str) -> dict:
    """Peak RSS while one call in `mode` runs, above the RSS just before it (forward working memory plus
    what the capture holds), in a fresh process so earlier calls leave nothing behind."""
    net, probe, inputs = _setup(threads, model, blocks, dtype)
    kwargs = inputs(size)
    before = _rss_mib()
    with _PeakSampler() as sampler:
        held, _ = _call(net, probe, model, mode, kwargs)
    return {"held_mib": held / 2**20, "peak_above_model_mib": sampler.peak - before}


def timings(sizes: list[int], reps: int, threads: int, model: str, blocks: int | None,
            dtype: str) -> tuple[dict, dict]:
    """Median CPU seconds and wall seconds per call for each (size, mode), modes interleaved per repetition,
    and the largest difference of each mode's output from the bare call's.

    CPU time of this process is the ratio's basis: other jobs on a shared machine slow the wall clock of
    every mode, not the work a call does.
    """
    net, probe, inputs = _setup(threads, model, blocks, dtype)
    cpu = {(s, m): [] for s in sizes for m in ALL_MODES}
    wall = {(s, m): [] for s in sizes for m in ALL_MODES}
    diff = {}
    for size in sizes:
        kwargs = inputs(size)
        _call(net, probe, model, "all", kwargs)  # warm-up
        for _ in range(reps):
            for mode in ALL_MODES:
                c0, w0 = time.process_time(), time.perf_counter()
                _, out = _call(net, probe, model, mode, kwargs)
                cpu[(size, mode)].append(time.process_time() - c0)
                wall[(size, mode)].append(time.perf_counter() - w0)
                if mode == "bare":
                    bare = out
                diff[(size, mode)] = float((out.float() - bare.float()).abs().max())
            print(f"  rep done at {size}x{size}", file=sys.stderr)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in cpu}, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=sorted(SELECT), default="sd15")
    parser.add_argument("--blocks", type=int, default=None, help="transformers: blocks (FLUX: of each kind)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--modes", nargs="+", choices=ALL_MODES, default=ALL_MODES, help="bare is always timed")
    parser.add_argument("--memory", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(peak_memory(args.memory[0], int(args.memory[1]), args.threads, args.model, args.blocks,
                                     args.dtype)))
        return
    ALL_MODES[:] = ["bare", *[m for m in args.modes if m != "bare"]]
    seconds, diff = timings(args.sizes, args.reps, args.threads, args.model, args.blocks, args.dtype)
    memory = {}
    for size in args.sizes:
        for mode in ALL_MODES:
            cmd = [sys.executable, __file__, "--memory", mode, str(size), "--threads", str(args.threads),
                   "--model", args.model, "--dtype", args.dtype] + (["--blocks", str(args.blocks)] if args.blocks else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            memory[(size, mode)] = json.loads(out.strip().splitlines()[-1])
    arch = {"sd15": "SD 1.5 UNet", "sd3": "SD3-medium transformer", "flux": "FLUX.1 transformer"}[args.model]
    depth = f", {args.blocks} block(s) of each kind" if args.blocks else ""
    print(f"{arch} architecture{depth}, random weights, {args.dtype}, CPU, {args.threads} thread(s), {TEXT_TOKENS[args.model]} "
          f"text tokens, median of {args.reps} interleaved calls; ratios of process CPU time\n")
    print("| latent | capture | CPU s / call | wall s / call | ratio to bare | cache holds (MiB) | "
          "peak RSS above the loaded model (MiB) | max output difference from bare |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        bare = seconds[(size, "bare")][0]
        for mode in ALL_MODES:
            mem, (c, w) = memory[(size, mode)], seconds[(size, mode)]
            print(f"| {size}x{size} | {mode} | {c:.2f} | {w:.2f} | {c / bare:.3f} | {mem['held_mib']:.1f} | "
                  f"{mem['peak_above_model_mib']:.0f} | {diff[(size, mode)]:.1e} |")


if __name__ == "__main__":
    main()
