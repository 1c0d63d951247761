"""task=probe: one UNet call per image under a capture of the selected sites.

Writes per image, in out_dir/<image stem>/: captures.safetensors (one tensor per site, shapes in the index),
attention.png (maps per layer over the image) and index.json (sites, kinds, shapes, grids, timesteps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from diffprobe.config import load_configured_backbone, run_config, typed
from diffprobe.data.images import image_to_tensor, load_image
from diffprobe.data.inputs import input_images
from diffprobe.errors import DiffprobeError
from diffprobe.hooks import ProbeRegistry, Reduce
from diffprobe.io import save_figure, save_json, save_tensors
from diffprobe.runners import encode_images, encode_prompt, unet_step
from diffprobe.viz import map_grid

log = logging.getLogger(__name__)


@dataclass
class ProbeParams:
    sites: list[str] = field(default_factory=lambda: ["*.attn2.hook_probs"])
    prompt: str = ""
    timestep: int = 100
    add_noise: bool = False
    image_size: int | None = None
    heads: str = "mean"
    show: int = 8


def _picture_rows(cache, names, tokens: list[str], show: int) -> list[tuple[str, np.ndarray, list[str]]]:
    """Rows of map_grid: per cross-attn site its first tokens, per self-attn site a few queries, else the norm."""
    rows = []
    for name in names:
        kind = cache.sites[name].kind
        short = name.replace(".transformer_blocks", "").replace(".hook_probs", "").replace("attentions", "attn")
        if kind == "cross_attn":
            maps = cache.maps(name)[0]
            n = min(show, maps.shape[0])
            rows.append((short, maps[:n].float().numpy(), tokens[:n]))
        elif kind == "self_attn":
            maps = cache.maps(name)[0]
            h, w = cache.grid(name)
            picks = np.linspace(0, h * w - 1, num=min(show, h * w)).round().astype(int)
            rows.append((short, maps[picks].float().numpy(), [f"q({p // w},{p % w})" for p in picks]))
        else:
            feat = cache[name][0].float()
            rows.append((short, feat.norm(dim=0, keepdim=True).numpy(), ["|feature|"]))
    return rows


def run(cfg: DictConfig, out_dir: Path) -> dict:
    params = typed(cfg, ProbeParams, "probe")
    run_cfg = run_config(cfg)
    if params.heads not in ("mean", "sum", "none"):
        raise DiffprobeError(f"heads must be mean, sum or none, not {params.heads!r}")
    files = input_images(cfg.get("image"), out_dir)
    bb = load_configured_backbone(cfg)
    probe = ProbeRegistry(bb.unet)
    try:
        names = probe.select(list(params.sites))
    except KeyError as exc:
        raise DiffprobeError(f"{exc.args[0]} (list them with diffprobe.hooks.ProbeRegistry(unet).sites)") from None
    size = params.image_size or bb.sample_size
    deepest = bb.vae_factor * max(s.divisor for s in probe.sites.values())
    if size % deepest:
        raise DiffprobeError(f"image_size must be a multiple of {deepest} for this model, not {size}")
    cond = encode_prompt(bb, [params.prompt])
    ids = bb.tokenizer([params.prompt], padding="max_length", max_length=bb.max_tokens, truncation=True).input_ids[0]
    tokens = bb.tokenizer.convert_ids_to_tokens(ids)
    summary = {}
    for path in tqdm(files, desc="probe", disable=len(files) < 2):
        image = load_image(path)
        x = image_to_tensor(image, size)
        latents = encode_images(bb, x)
        generator = torch.Generator().manual_seed(run_cfg.seed)
        with torch.no_grad(), probe.capture(names, reduce=Reduce(heads=params.heads)) as cache:
            unet_step(bb, latents, params.timestep, cond, noise="random" if params.add_noise else None,
                      generator=generator)
        target = out_dir / path.stem
        save_tensors(target / "captures.safetensors", {n: cache[n] for n in names},
                     metadata={"timestep": str(params.timestep), "image": str(path)})
        picture = ((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        attn_names = [n for n in names if probe.sites[n].is_attention][:24] or names[:24]
        save_figure(target / "attention.png", map_grid(picture, _picture_rows(cache, attn_names, tokens, params.show)))
        index = {
            "image": str(path), "model": cfg.model.name, "image_size": size, "timestep": params.timestep,
            "add_noise": params.add_noise, "prompt": params.prompt, "tokens": tokens[: params.show],
            "timesteps": cache.timesteps,
            "sites": {n: {"kind": probe.sites[n].kind, "divisor": probe.sites[n].divisor,
                          "heads": probe.sites[n].heads, "shape": list(cache[n].shape), "grid": list(cache.grid(n))}
                      for n in names},
        }
        save_json(target / "index.json", index)
        summary[str(path)] = str(target)
    return summary
