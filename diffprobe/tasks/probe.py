"""task=probe: one UNet call per image under a capture of the selected sites.

Writes per image, in out_dir/<image stem>/: captures.safetensors (one tensor per site, shapes in the index),
attention.png (maps per layer over the image) and index.json (sites, kinds, shapes, grids, timesteps).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from diffprobe.config import section
from diffprobe.heads.probe import ProbeHead, ProbeSettings
from diffprobe.io import save_figure, save_json, save_tensors
from diffprobe.report import write_report
from diffprobe.runner import Item
from diffprobe.tasks.image_runs import Job, run_job
from diffprobe.viz import map_grid

log = logging.getLogger(__name__)


def _picture_rows(view, names, tokens: list[str], show: int) -> list[tuple[str, np.ndarray, list[str]]]:
    """Rows of map_grid: per cross-attn site its first tokens, per self-attn site a few queries, else the norm."""
    rows = []
    for name in names:
        kind = view.sites[name].kind
        short = name.replace(".transformer_blocks", "").replace(".hook_probs", "").replace("attentions", "attn")
        if kind == "cross_attn":
            maps = view.maps(name)[0]
            n = min(show, maps.shape[0])
            rows.append((short, maps[:n].float().numpy(), tokens[:n]))
        elif kind == "self_attn":
            maps = view.maps(name)[0]
            h, w = view.grid(name)
            picks = np.linspace(0, h * w - 1, num=min(show, h * w)).round().astype(int)
            rows.append((short, maps[picks].float().numpy(), [f"q({p // w},{p % w})" for p in picks]))
        else:
            feat = view[name][0].float()
            rows.append((short, feat.norm(dim=0, keepdim=True).numpy(), ["|feature|"]))
    return rows


def _write_page(path: Path, title: str, picture: np.ndarray, rows: list, view, names: list[str]) -> None:
    """report.html: the cross-attention sites' token maps (one chip per token, one layer per site, the mean
    first), resized to the finest of their grids; without cross-attention, each site's first map as one chip."""
    import torch
    import torch.nn.functional as F

    cross = [r for r, n in zip(rows, names) if view.sites[n].kind == "cross_attn"]
    picked = cross or [(title_, maps[:1], ["map"]) for title_, maps, _ in rows]
    size = max((m.shape[-2:] for _, m, _ in picked), key=lambda s: s[0] * s[1])
    maps = [F.interpolate(torch.as_tensor(m, dtype=torch.float32)[None], size=tuple(size), mode="bilinear",
                          align_corners=False)[0].numpy() for _, m, _ in picked]
    count = min(len(m) for m in maps)
    slices = {(i + 1, 0): m[:count] for i, m in enumerate(maps)}
    slices[(0, 0)] = np.mean([m[:count] for m in maps], axis=0)
    write_report(path, title, picture, picked[0][2][:count], slices, ["mean over sites", *(t for t, _, _ in picked)])


def write_probe(view, head: ProbeHead, tokens: list[str], item: Item, target: Path, model: str) -> dict:
    """The files of one image, in its folder `target`, from the head's view of the pass."""
    s = head.settings
    path = Path(item.key)
    names = view.names
    save_tensors(target / "captures.safetensors", {n: view[n] for n in names},
                 metadata={"timestep": str(s.timestep), "image": str(path)})
    x = head.inputs(item)
    picture = ((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    attn_names = [n for n in names if view.sites[n].is_attention][:24] or names[:24]
    rows = _picture_rows(view, attn_names, tokens, s.show)
    save_figure(target / "attention.png", map_grid(picture, rows))
    _write_page(target / "report.html", f"{path.name}: probe", picture, rows, view, attn_names)
    index = {
        "image": str(path), "model": model, "image_size": head.size, "timestep": s.timestep,
        "noise": s.noise, "prompt": s.prompt, "tokens": tokens[: s.show], "timesteps": view.timesteps,
        "sites": {n: {"kind": view.sites[n].kind, "divisor": view.sites[n].divisor, "heads": view.sites[n].heads,
                      "shape": list(view[n].shape), "grid": list(view.grid(n))} for n in names},
    }
    save_json(target / "index.json", index)
    return {"sites": len(names)}


def make_head(bb, settings: ProbeSettings) -> ProbeHead:
    """The probe head with its site globs resolved (a pattern matching nothing fails here)."""
    head = ProbeHead(settings, bb.check_image_size(settings.image_size))
    head.plan(bb.probe.sites)
    return head


def settings_of(cfg: DictConfig) -> ProbeSettings:
    """The probe.* keys, validated (no model needed)."""
    settings = section(cfg, "probe", ProbeSettings)
    settings.validate()
    return settings


def job(cfg: DictConfig, bb) -> Job:
    """The probe head and the writer of an image's files."""
    settings = settings_of(cfg)
    head, tokens = make_head(bb, settings), bb.context_tokens(settings.prompt)
    return Job([head], lambda res, path, image, target: write_probe(res[0], head, tokens, Item(str(path), image),
                                                                    target, cfg.model.name))


def run(cfg: DictConfig, out_dir: Path) -> dict:
    return run_job(cfg, out_dir, "probe")
