"""Cost of capturing attention with diffprobe.hooks on the SD 1.5 UNet architecture (random weights, CPU).

For latents of 32x32 and 64x64 (256 and 512 px images) it times, in one process with the modes interleaved:
  bare   -- the UNet forward with no hooks;
  cross  -- capturing all 16 cross-attention probability maps (heads averaged);
  all    -- capturing all 32 attention maps, 64x64 self-attention included (heads averaged);
each capture in both attention modes (recompute: the model keeps its fused attention and the probabilities
are recomputed; reuse: each captured layer's SDPA call is answered by an explicit query-chunked attention
whose probabilities are kept),
and reports each as a ratio of process CPU time to bare (robust to other jobs on a shared machine), with the
bytes the cache holds and the peak RSS during one call in a fresh process, above the RSS of the loaded UNet.

    python benchmarks/capture_overhead.py [--sizes 32 64] [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

MODES = {"bare": (None, None), "cross": ("*.attn2.hook_probs", "recompute"), "all": ("*.hook_probs", "recompute"),
         "cross, reuse": ("*.attn2.hook_probs", "reuse"), "all, reuse": ("*.hook_probs", "reuse")}


def _setup(threads: int):
    import torch

    from diffprobe.architectures import build_unet
    from diffprobe.hooks import ProbeRegistry

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = build_unet("sd15", device="meta").to_empty(device="cpu")
    for module in unet.modules():  # default init in place: no second copy of the weights at any time
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    unet.eval().requires_grad_(False)
    return unet, ProbeRegistry(unet), torch.randn(1, 77, 768)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _call(unet, probe, mode: str, latents, context):
    """One UNet call in `mode`; returns (the bytes the capture cache holds, the UNet's output)."""
    import torch

    from diffprobe.hooks import Reduce

    selection, attention = MODES[mode]
    with torch.no_grad():
        if selection is None:
            return 0, unet(latents, 300, encoder_hidden_states=context).sample
        with probe.capture(selection, reduce=Reduce(heads="mean"), attention=attention) as cache:
            out = unet(latents, 300, encoder_hidden_states=context).sample
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


def peak_memory(mode: str, size: int, threads: int) -> dict:
    """Peak RSS while one call in `mode` runs, above the RSS just before it (forward working memory plus
    what the capture holds), in a fresh process so earlier calls leave nothing behind."""
    import torch

    unet, probe, context = _setup(threads)
    latents = torch.randn(1, 4, size, size)
    before = _rss_mib()
    with _PeakSampler() as sampler:
        held, _ = _call(unet, probe, mode, latents, context)
    return {"held_mib": held / 2**20, "peak_above_model_mib": sampler.peak - before}


def timings(sizes: list[int], reps: int, threads: int) -> tuple[dict, dict]:
    """Median CPU seconds and wall seconds per call for each (size, mode), modes interleaved per repetition,
    and the largest difference of each mode's UNet output from the bare call's.

    CPU time of this process is the ratio's basis: other jobs on a shared machine slow the wall clock of
    every mode, not the work a call does.
    """
    import torch

    unet, probe, context = _setup(threads)
    cpu = {(s, m): [] for s in sizes for m in MODES}
    wall = {(s, m): [] for s in sizes for m in MODES}
    diff = {}
    for size in sizes:
        latents = torch.randn(1, 4, size, size)
        _call(unet, probe, "all", latents, context)  # warm-up
        for _ in range(reps):
            for mode in MODES:
                c0, w0 = time.process_time(), time.perf_counter()
                _, out = _call(unet, probe, mode, latents, context)
                cpu[(size, mode)].append(time.process_time() - c0)
                wall[(size, mode)].append(time.perf_counter() - w0)
                if mode == "bare":
                    bare = out
                diff[(size, mode)] = float((out - bare).abs().max())
            print(f"  rep done at {size}x{size}", file=sys.stderr)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in cpu}, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(peak_memory(args.memory[0], int(args.memory[1]), args.threads)))
        return
    seconds, diff = timings(args.sizes, args.reps, args.threads)
    memory = {}
    for size in args.sizes:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--memory", mode, str(size), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            memory[(size, mode)] = json.loads(out.strip().splitlines()[-1])
    print(f"SD 1.5 UNet architecture, random weights, CPU, {args.threads} thread(s), "
          f"median of {args.reps} interleaved calls; ratios of process CPU time\n")
    print("| latent | capture | CPU s / call | wall s / call | ratio to bare | cache holds (MiB) | "
          "peak RSS above the loaded UNet (MiB) | max output difference from bare |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        bare = seconds[(size, "bare")][0]
        for mode in MODES:
            mem, (c, w) = memory[(size, mode)], seconds[(size, mode)]
            print(f"| {size}x{size} | {mode} | {c:.2f} | {w:.2f} | {c / bare:.3f} | {mem['held_mib']:.1f} | "
                  f"{mem['peak_above_model_mib']:.0f} | {diff[(size, mode)]:.1e} |")


if __name__ == "__main__":
    main()
