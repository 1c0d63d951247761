"""One pass for several heads (task=analyze's runner path) against running each head on its own.

    python benchmarks/analyze_pass.py [--images 4] [--size 256] [--threads 1]

SD 1.5 UNet architecture with random weights (a 1-layer, 768-wide random text encoder and the tiny VAE, so
the UNet dominates as with real weights), images of `size` px. Heads: DiffSeg, localize (word "cat") and a
probe of every cross-attention map at t = 300. Two settings: every head conditioned on the same prompt
("a cat": one batch row per image, one call for all three), and each head's default prompt (DiffSeg and the
probe the empty prompt, localize "a cat": two rows in one call). For each, the process CPU time and wall
time of the combined run and of the three separate runs, interleaved per image; ratio = combined / separate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffprobe.loading import build_denoiser, tiny_backbone  # noqa: E402
from diffprobe.heads.diffseg.head import DiffSegHead, DiffSegSettings  # noqa: E402
from diffprobe.heads.localize import LocalizeHead, LocalizeSettings  # noqa: E402
from diffprobe.heads.probe import ProbeHead, ProbeSettings  # noqa: E402
from diffprobe.runner import Item, run_heads  # noqa: E402


def backbone():
    from transformers import CLIPTextConfig, CLIPTextModel

    bb = tiny_backbone("sd15")
    torch.manual_seed(0)
    bb.unet = build_denoiser("sd15").eval().requires_grad_(False)
    tok = bb.tokenizer
    config = CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                            num_attention_heads=12, max_position_embeddings=77)
    bb.text_encoder = CLIPTextModel(config).eval().requires_grad_(False)
    return bb


def heads(bb, size: int, shared: bool) -> list:
    prompt = "a cat"
    loc = LocalizeSettings(words=["cat"], prompt=prompt)
    return [DiffSegHead(DiffSegSettings(tau=0.2, prompt=prompt if shared else ""), size),
            LocalizeHead(loc, bb.word_positions(prompt, ["cat"]), size),
            ProbeHead(ProbeSettings(sites=["*.attn2.hook_probs"], timestep=300, prompt=prompt if shared else ""), size)]


def measure(fn) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bb = backbone()
    rng = np.random.default_rng(0)
    items = [Item(f"img{i}", Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)))
             for i in range(args.images)]
    print(f"SD 1.5 UNet architecture, random weights, {args.size} px, {args.images} images, {args.threads} thread(s); "
          "heads: DiffSeg, localize, probe (all cross-attention)\n")
    print("| conditioning | UNet calls per image (combined / separate) | CPU s per image, combined | CPU s, separate | "
          "CPU ratio | wall ratio | target (1/3 + 10 %) |")
    print("|---|---|---|---|---|---|---|")
    for shared in (True, False):
        hs = heads(bb, args.size, shared)
        calls = []
        handle = bb.unet.register_forward_pre_hook(lambda *a: calls.append(1))
        run_heads(bb, hs, items[0], torch.Generator().manual_seed(0))             # warm-up, and count calls
        combined_calls = len(calls)
        calls.clear()
        for h in hs:
            run_heads(bb, [h], items[0], torch.Generator().manual_seed(0))
        separate_calls = len(calls)
        handle.remove()
        together, alone = [], []
        for item in items:
            together.append(measure(lambda: run_heads(bb, hs, item, torch.Generator().manual_seed(0))))
            alone.append(measure(lambda: [run_heads(bb, [h], item, torch.Generator().manual_seed(0)) for h in hs]))
        c1, w1 = (statistics.median(x[k] for x in together) for k in (0, 1))
        c3, w3 = (statistics.median(x[k] for x in alone) for k in (0, 1))
        name = "one prompt for all heads" if shared else "each head's default (\"\" and \"a cat\")"
        print(f"| {name} | {combined_calls} / {separate_calls} | {c1:.2f} | {c3:.2f} | {c1 / c3:.3f} | {w1 / w3:.3f} | "
              f"0.433 |")


if __name__ == "__main__":
    main()
