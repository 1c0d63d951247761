"""Cost of task=heatmap's capture over a whole generation: time against a bare generation, and peak memory at 1,
10 and 50 steps (flat: the maps are a running mean).

    python benchmarks/heatmap_cost.py [--model mini] [--model-path DIR] [--steps 50] [--reps 3] [--threads 2]

In one process, with the modes interleaved `reps` times: `bare` is the family's own generation
(diffprobe.drives.generate), `capture` the same generation under the head's capture alone (DAAM's cross-attention
sites with their heads, averaged over the calls, the prompt's rows) and `heatmap` the heat-map head's whole run,
maps and report slices made; ratios of process CPU time and of wall time. Then, each in a fresh process, the peak
RSS of a heat-map run at 1, 10 and `steps` steps and of `steps` steps keeping every step's maps (per_step=true).
Prints a JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPT = "a red bird over a house"
MODES = ("bare", "capture", "heatmap")


def _backbone(model: str, path: str | None):
    from hydra import compose, initialize_config_module

    from diffprobe.__main__ import CONFIG_MODULE, prepare_overrides
    from diffprobe.config import load_configured_backbone

    extra = [f"model.path={path}"] if path else []
    overrides, _ = prepare_overrides(["task=heatmap", f"model={model}", *extra])
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return load_configured_backbone(compose("config", overrides=overrides))


def _head(bb, steps: int, per_step: bool = False):
    from diffprobe.heads.heatmap import HeatmapHead, HeatmapSettings

    groups = bb.word_positions(PROMPT, PROMPT.split())
    return HeatmapHead(HeatmapSettings(steps=steps, per_step=per_step), bb.sample_size, PROMPT, groups,
                       bb.grid_factor)


def _run(bb, mode: str, steps: int):
    import torch

    from diffprobe.drives import generate
    from diffprobe.runner import Item, run_heads

    from diffprobe.heads.heatmaps import daam_sites
    from diffprobe.hooks import BatchLayout, Need, Reduce

    generator = torch.Generator().manual_seed(0)
    if mode == "bare":
        return generate(bb, PROMPT, num_steps=steps, generator=generator)[0]
    if mode == "capture":   # the head's capture alone, no maps made
        need = Need(daam_sites(bb.probe.sites), Reduce(heads="none", steps="mean"), layout=BatchLayout(cfg=True))
        with bb.probe.capture(need):
            return generate(bb, PROMPT, num_steps=steps, generator=generator)[0]
    return run_heads(bb, [_head(bb, steps)], Item(PROMPT), generator=generator)[0]["image"]


def timing(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    bb = _backbone(args.model, args.model_path)
    _run(bb, "heatmap", 2)   # warm-up: weights read, kernels chosen
    cpu, wall = {m: [] for m in MODES}, {m: [] for m in MODES}
    for _ in range(args.reps):
        for mode in MODES:
            c0, w0 = time.process_time(), time.perf_counter()
            _run(bb, mode, args.steps)
            cpu[mode].append(time.process_time() - c0)
            wall[mode].append(time.perf_counter() - w0)
    med = {m: (statistics.median(cpu[m]), statistics.median(wall[m])) for m in cpu}
    return {m: {"wall_s": med[m][1], "cpu_ratio": med[m][0] / med["bare"][0], "wall_ratio": med[m][1] / med["bare"][1]}
            for m in MODES}


def peak(args, steps: int, per_step: bool) -> float:
    """Peak RSS (GiB) of a fresh process running the heat-map head once."""
    code = ("import sys; sys.path.insert(0, %r); import heatmap_cost as h, torch; torch.set_num_threads(%d); "
            "from diffprobe.runner import Item, run_heads; bb = h._backbone(%r, %r); "
            "run_heads(bb, [h._head(bb, %d, %r)], Item(h.PROMPT), generator=torch.Generator().manual_seed(0))"
            % (str(ROOT / "benchmarks"), args.threads, args.model, args.model_path, steps, per_step))
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"the {steps}-step run failed ({status})")
    return usage.ru_maxrss * 1024 / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mini")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    record = {"model": args.model, "steps": args.steps, "threads": args.threads, "load_at_start": os.getloadavg()[0],
              **timing(args)}
    record["peak_gib"] = {f"{n} steps": peak(args, n, False) for n in sorted({1, 10, args.steps})}
    record["peak_gib"][f"{args.steps} steps, per_step"] = peak(args, args.steps, True)
    record["load_at_end"] = os.getloadavg()[0]
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
