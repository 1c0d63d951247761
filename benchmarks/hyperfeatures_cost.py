"""Cost of hyperfeature extraction per image: time and peak memory for S=1 and S=11 saved steps, streaming
each step through the aggregator vs holding all L x S maps first (the reference's way).

SD 1.5-architecture UNet with random weights (cost does not depend on the weights) and the SD 1.5 aggregator
(12 layers, 384-d, 6.5 M parameters); tiny VAE and a one-layer 768-d text encoder stand in for theirs (their
cost is excluded on purpose). DDIM inversion with T = S calls, all saved (the reference T=50 costs 50 calls
whatever S). Each configuration runs in a fresh process on one thread; memory is the peak resident set
above the process's level just before extraction, sampled every 5 ms, plus the bytes the consumer held.

    python benchmarks/hyperfeatures_cost.py [--size 512] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

CONFIGS = [(1, "stream"), (1, "hold"), (11, "stream"), (11, "hold")]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Samples the resident set size in a thread; .peak is the largest value seen (MB)."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _backbone(size: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffprobe.loading import build_denoiser
    from diffprobe.loading import tiny_backbone

    bb = tiny_backbone("sd15", seed=0)
    bb.unet = build_denoiser("sd15").eval().requires_grad_(False)
    tok = bb.tokenizer
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=768, num_hidden_layers=1,
                         num_attention_heads=12, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    bb.text_encoder = CLIPTextModel(cfg).eval().requires_grad_(False)
    torch.manual_seed(0)
    return bb


def run_one(S: int, mode: str, size: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from diffprobe.heads.hyperfeatures.extract import ExtractionSettings, extract_descriptors, extract_features
    from diffprobe.heads.hyperfeatures.model import HyperfeatureModel

    bb = _backbone(size)
    ex = ExtractionSettings(num_steps=S, save_every=1, image_size=size, sample_latent=False)
    model = HyperfeatureModel.build(bb.probe.sites, ex, output_size=size // 8)
    x = torch.rand(1, 3, size, size) * 2 - 1
    held = 0
    start_rss = _rss_mb()
    t0 = time.perf_counter()
    with PeakRSS() as rss, torch.no_grad():
        if mode == "stream":
            desc = extract_descriptors(bb, model.net, x, ex)
            held = desc.numel() * desc.element_size()
        else:
            feats = extract_features(bb, x, ex, layers=model.net.config.layers)
            held = sum(f.numel() * f.element_size() for step in feats for f in step.values())
            desc = model.net(feats)
    seconds = time.perf_counter() - t0
    return {"S": S, "mode": mode, "size": size, "seconds": seconds, "peak_rss_mb": rss.peak - start_rss,
            "held_mb": held / 2**20, "unet_calls": S, "params": model.net.num_parameters(),
            "desc_shape": list(desc.shape)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--one", nargs=2, metavar=("S", "MODE"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1], args.size)))
        return
    rows = []
    for S, mode in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--one", str(S), mode],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done S={S} {mode}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    base = rows[0]["seconds"]
    print(f"hyperfeature extraction per image, SD 1.5 architecture (random weights), {args.size} px, CPU, "
          f"torch.set_num_threads(1), other jobs running on the machine")
    print(f"aggregator at S=11: {rows[-1]['params']:,} parameters, descriptors {rows[-1]['desc_shape']}")
    print("| S | mode | UNet calls | time (s) | time / (S=1 stream) | peak RSS above start (MB) | held by consumer (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['S']} | {r['mode']} | {r['unet_calls']} | {r['seconds']:.1f} | {r['seconds'] / base:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['held_mb']:.1f} |")


if __name__ == "__main__":
    main()
