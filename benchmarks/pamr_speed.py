"""PAMR's label refinement (diffprobe.heads.pamr.refine_labels): masks refined one at a time (MAX_CHUNK = 1, how
it ran before) against chunks of up to MAX_CHUNK, in the same run, on random images and label maps.

    python benchmarks/pamr_speed.py

One thread. A 64 px image (mini's and mini-dit's size) with as many labels as DiffSeg gives there at tau 0.05 to
0.9 (about 110 to 4 segments), and larger images, where a chunk is one mask and nothing should change.
"""

from __future__ import annotations

import time

import torch

from diffprobe.heads import pamr

CASES = ((64, 4), (64, 20), (64, 110), (128, 20), (512, 20))   # (side, labels)


def seconds(side: int, labels: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, side, side, generator=g)
    label_map = torch.randint(0, labels, (side // 4, side // 4), generator=g)
    label_map = label_map.repeat_interleave(4, 0).repeat_interleave(4, 1)     # blocks, as upsampled segments
    pamr.refine_labels(label_map, image)                                       # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        pamr.refine_labels(label_map, image)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.set_num_threads(1)
    chunked = pamr.MAX_CHUNK
    print("| image | labels | one mask at a time (s) | chunks (s) | masks per chunk | speed-up | declared peak (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for side, labels in CASES:
        repeats = 5 if side <= 128 else 1
        pamr.MAX_CHUNK = 1
        alone = seconds(side, labels, repeats)
        pamr.MAX_CHUNK = chunked
        together = seconds(side, labels, repeats)
        print(f"| {side} x {side} | {labels} | {alone:.3f} | {together:.3f} | {pamr.chunk_size(side, side)} | "
              f"{alone / together:.2f}x | {pamr.refine_bytes(side, side) / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
