"""task=heatmap: one generated image per prompt and DAAM's heat map of each word over its whole generation; with
image= (a file or a folder), the same over each real image's DDIM inversion under the prompt (its caption).

Writes, per prompt (or per image, the image task's folder), in out_dir/<number>_<prompt made safe>/: image.png,
heatmaps.png (the image and each word's map over it), heatmaps.safetensors (each word's (H, W) map; with per_step
also per_step/<word>, (steps, H, W)) and heatmaps.json (the prompt, each word's context columns and tokens, the
settings); summary.json lists the prompts (images) and their folders. A rerun in the same folder continues.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from diffprobe.config import check_values, load_configured_backbone, run_config, section
from diffprobe.errors import DiffprobeError
from diffprobe.heads.heatmap import HeatmapHead, HeatmapSettings
from diffprobe.io import save_figure, save_json, save_png, save_tensors
from diffprobe.items import check_fingerprint
from diffprobe.report import write_report
from diffprobe.runfolder import safe_name
from diffprobe.runner import Item, run_heads
from diffprobe.tasks.image_runs import Job, run_job
from diffprobe.viz import map_grid

log = logging.getLogger(__name__)


@dataclass
class HeatmapTask(HeatmapSettings):
    """The heatmap.* keys: the head's settings, the prompts, the words and the image size."""

    LIMITS = {"image_size": "8..16384"}

    prompt: Any = None
    words: list[str] | None = None
    image_size: int | None = None
    prompts: list[str] = field(default_factory=list)   # filled from `prompt`

    def validate(self) -> None:
        given = OmegaConf.to_object(self.prompt) if OmegaConf.is_config(self.prompt) else self.prompt
        prompts = [given] if isinstance(given, str) else list(given) if isinstance(given, (list, tuple)) else []
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise DiffprobeError('task=heatmap needs prompt="a red cat on a mat" or prompt="[a red cat, a dog]"')
        self.prompts = prompts
        check_values(self, "heatmap")
        self.check_concepts()


def settings_of(cfg: DictConfig) -> HeatmapTask:
    """The heatmap.* keys, validated (no model needed)."""
    settings = section(cfg, "heatmap", HeatmapTask)
    settings.validate()
    return settings


def _head(bb, s: HeatmapTask, prompt: str, size: int, real: bool = False) -> tuple[HeatmapHead, list[str], list]:
    words = s.words or prompt.split()
    groups = bb.word_positions(prompt, words)
    head_settings = HeatmapSettings(**{k: getattr(s, k) for k in HeatmapSettings.__dataclass_fields__})
    return HeatmapHead(head_settings, size, prompt, groups, bb.grid_factor, real), words, groups


def _record(cfg: DictConfig, s: HeatmapTask, aggregation: str) -> dict:
    """What heatmaps.json says of the run: the model, the settings, how the maps were made."""
    return {"model": cfg.model.name, "settings": {k: v for k, v in asdict(s).items() if k != "prompt"},
            "aggregation": aggregation}


def _write(folder: Path, bb, prompt: str, words: list[str], groups, result: dict, record: dict) -> None:
    image = (result["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    maps = result["maps"]
    concepts = record["settings"]["concepts"] or []
    tensors = {f"word/{w}": m.contiguous() for w, m in zip(words, maps)}
    if result["per_step"] is not None:
        tensors |= {f"per_step/{w}": result["per_step"][:, i].contiguous() for i, w in enumerate(words)}
    if concepts:
        tensors |= {f"concept/{c}": m.contiguous() for c, m in zip(concepts, result["concepts"])}
    save_tensors(folder / "heatmaps.safetensors", tensors, metadata={"prompt": prompt})
    peak = maps.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
    rows = [(prompt[:40], (maps / peak).numpy(), words)]
    if concepts:
        rows.append(("concepts (ConceptAttention)", result["concepts"].numpy(), concepts))
    save_figure(folder / "heatmaps.png", map_grid(image, rows, panel=2.0))
    save_png(folder / "image.png", image)
    page = result["page"]
    write_report(folder / "report.html", prompt, image, words + [f"[{c}]" for c in concepts],
                 {k: v.numpy() for k, v in page["slices"].items()}, page["layers"], page["steps"])
    tokens = bb.context_tokens(prompt)
    save_json(folder / "heatmaps.json", {**record, "prompt": prompt, "words": [
        {"word": w, "columns": g, "tokens": [tokens[c] for c in g], "peak": float(m.max())}
        for w, g, m in zip(words, groups, maps)],
        "concepts": [{"concept": c, "peak": float(m.max())} for c, m in zip(concepts, result["concepts"])]
        if concepts else []})


def job(cfg: DictConfig, bb) -> Job:
    """image=: the head over each real image's inversion under the one prompt, and the writer of its files."""
    s = settings_of(cfg)
    if len(s.prompts) != 1:
        raise DiffprobeError("with image=, give one prompt (the images' caption), not a list")
    size = bb.check_image_size(s.image_size)
    head, words, groups = _head(bb, s, s.prompts[0], size, real=True)
    record = _record(cfg, s, "DAAM over a DDIM inversion (docs/heatmaps.md)")

    def write(results, path, image, target):
        _write(target, bb, s.prompts[0], words, groups, results[0], {**record, "image": str(path)})
        return {"words": words}
    return Job([head], write)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    if cfg.get("image"):
        return run_job(cfg, out_dir, "heatmap")
    s = settings_of(cfg)
    seed = run_config(cfg).seed
    record = {**_record(cfg, s, "DAAM (docs/heatmaps.md)"), "seed": seed}
    settings_file = out_dir / "heatmap_settings.json"
    if settings_file.is_file():
        check_fingerprint(json.loads(settings_file.read_text()), record, out_dir)
    bb = load_configured_backbone(cfg)
    size = bb.check_image_size(s.image_size)
    heads = [_head(bb, s, p, size) for p in s.prompts]   # every word found before any generation
    save_json(settings_file, record)
    rows = []
    for i, (prompt, (head, words, groups)) in enumerate(tqdm(list(zip(s.prompts, heads)), desc="heatmap")):
        folder = out_dir / f"{i:03d}_{safe_name(prompt, 60)}"
        if not (folder / "heatmaps.json").is_file():
            generator = torch.Generator().manual_seed(seed + i)
            (result,) = run_heads(bb, [head], Item(prompt), generator=generator, progress=True)
            _write(folder, bb, prompt, words, groups, result, {**record, "image_seed": seed + i})
        rows.append({"prompt": prompt, "folder": folder.name, "words": words})
    summary = {"model": cfg.model.name, "prompts": rows}
    save_json(out_dir / "summary.json", summary)
    log.info("heat maps of %d prompt(s) in %s", len(rows), out_dir)
    return summary
