"""Time and memory of the graph operators (diffprobe.graph) at 32 x 32 (1,024 nodes) and 64 x 64 (4,096 nodes,
SD at 512 px), on planted self-attention (each position attends to its Voronoi region, 12 regions, noise).

    python benchmarks/graph_ops.py [--sides 32 64] [--threads 1]

Each operator runs on the same P (Q x Q, float32) in a fresh process (so its peak RSS above the loaded
inputs is its own), median of 3 runs; the word activation is the indicator of one region blurred.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the planted maps

OPS = ("attention graph", "feature grid graph", "power k=2", "random walk g=0.7", "diffusion beta=10 (grid)",
       "diffusion beta=10 (attention)", "Fiedler vector", "recursive ncut")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def inputs(side: int):
    import torch.nn.functional as F

    from diffseg_planted import planted_attention, voronoi_segmentation

    seg = voronoi_segmentation(side, 12, seed=0)
    probs = planted_attention(seg, side, noise=0.2, seed=1)[0]
    word = F.avg_pool2d((seg == 3)[None, None].float(), 5, 1, 2)[0, 0].reshape(-1, 1)
    return probs, word, (side, side)


def run_op(op: str, probs, word, grid):
    """Returns a short note (iterations, segments) of one run of `op`."""
    from diffprobe import graph

    if op == "attention graph":
        graph.attention_graph(probs)
        return ""
    if op == "feature grid graph":
        graph.feature_graph(probs, grid, 8, temperature=0.1)
        return ""
    if op == "power k=2":
        graph.attention_power(probs, word, 2)
        return ""
    if op == "random walk g=0.7":
        return f"{graph.random_walk(probs, word, 0.7)[1].iterations} steps"
    if op == "diffusion beta=10 (grid)":
        g = graph.feature_graph(probs, grid, 8, temperature=0.1)
        return f"{graph.laplacian_diffusion(g, word, 10.0)[1].iterations} CG iterations"
    if op == "diffusion beta=10 (attention)":
        return f"{graph.laplacian_diffusion(graph.attention_graph(probs), word, 10.0)[1].iterations} CG iterations"
    if op == "Fiedler vector":
        graph.fiedler_vector(graph.cosine_affinity(probs, 10.0))
        return "Lanczos" if probs.shape[0] > graph.ncut.DENSE_BELOW else "dense"
    labels, costs = graph.recursive_ncut(graph.cosine_affinity(probs, 10.0), 0.5)
    return f"{int(labels.max()) + 1} segments"


def measure(op: str, side: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    probs, word, grid = inputs(side)
    run_op(op, probs, word, grid)  # warm-up
    times, note = [], ""
    base, peak = _rss_mib(), [0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in range(3):
        t0 = time.process_time()
        note = run_op(op, probs, word, grid)
        times.append(time.process_time() - t0)
    stop.set()
    thread.join()
    return {"seconds": statistics.median(times), "peak_mib": max(peak[0], _rss_mib()) - base, "note": note}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", nargs=2, metavar=("OP", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.threads)))
        return
    print(f"diffprobe.graph on planted attention, CPU, {args.threads} thread(s); P alone is Q^2 x 4 bytes "
          "(4 MiB at 32 x 32, 64 MiB at 64 x 64)\n")
    print("| grid (nodes) | operator | CPU s | peak RSS above the inputs (MiB) | note |")
    print("|---|---|---|---|---|")
    for side in args.sides:
        for op in OPS:
            out = subprocess.run([sys.executable, __file__, "--one", op, str(side), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"| {side}x{side} ({side * side}) | {op} | {r['seconds']:.3f} | {r['peak_mib']:.0f} | {r['note']} |")


if __name__ == "__main__":
    main()
