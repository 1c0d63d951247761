"""Images per second of task=diffseg_eval over 1 and 2 processes (torchrun, gloo) on this machine.

    python benchmarks/distributed_throughput.py [--images 60] [--out /tmp/dist_bench]

World scenes in the COCO-Stuff layout (task=world), model=mini at 64 px. Runs: one process with one torch
thread, one process with two threads, two processes with one thread each (the machine has 2 cores). Each run
starts in a fresh folder; wall time includes loading the model in every process. Peak RSS is the largest
resident size of any process of the run (getrusage of the children).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(out: Path, data: Path, processes: int, threads: int) -> tuple[float, dict]:
    args = ["-m", "diffprobe", "task=diffseg_eval", "model=mini", "data=coco_stuff27", f"data.root={data}",
            f"data.list_file={data / 'curated/val2017/Coco164kFull_Stuff_Coarse_7.txt'}", f"hydra.run.dir={out}"]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                          "--master_port", "29561"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *launcher, *args], cwd=REPO, check=True, env=env, capture_output=True)
    return time.perf_counter() - start, json.loads((out / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path("/tmp/dist_bench"))
    args = ap.parse_args()
    data = args.out / "world_coco"
    if not data.is_dir():
        subprocess.run([sys.executable, "-m", "diffprobe", "task=world", "world.format=coco_stuff",
                        f"world.n={args.images}", f"world.out={data}", f"hydra.run.dir={args.out / 'world_run'}"],
                       cwd=REPO, check=True, capture_output=True)
    rows = []
    for processes, threads in ((1, 1), (1, 2), (2, 1)):
        out = args.out / f"run_{processes}x{threads}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        seconds, metrics = run(out, data, processes, threads)
        peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
        rows.append((processes, threads, seconds, metrics, peak))
    base = rows[0][2]
    print(f"task=diffseg_eval, model=mini, {args.images} world images at 64 px, load average at end "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| processes x threads | wall s | images / s | speed-up vs 1 x 1 | peak RSS per process (MiB) | mIoU (per image) |")
    print("|---|---|---|---|---|---|")
    for processes, threads, seconds, metrics, peak in rows:
        miou = metrics["results"][0]["miou"] * 100
        print(f"| {processes} x {threads} | {seconds:.1f} | {args.images / seconds:.2f} | {base / seconds:.2f} | "
              f"{peak:.0f} | {miou:.2f} |")


if __name__ == "__main__":
    main()
