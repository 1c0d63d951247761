"""task=analyze tasks=[...]: several heads over the same images, one denoiser pass per image for the heads whose drives
agree (DiffSeg and localize share t=300 on the clean latent by default; probe shares it with
probe.timestep=300). Each head writes exactly the files its own task writes, in out_dir/<head>/, with its own
summary.json; every head's keys are its task's (diffseg.*, localize.*, probe.*).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from diffprobe.config import load_configured_backbone, run_config, run_fingerprint, section
from diffprobe.data.inputs import input_images
from diffprobe.errors import DiffprobeError
from diffprobe.io import save_json
from diffprobe.runner import Head, Item
from diffprobe.tasks.image_runs import process_with_heads

HEADS = ("diffseg", "localize", "probe")


@dataclass
class AnalyzeSettings:
    tasks: list = field(default_factory=lambda: ["diffseg", "localize"])


@dataclass
class Job:
    """One task's heads in the shared pass and how it writes an image's files from their results."""

    name: str
    heads: list[Head]
    write: Callable[[list, Path, object, Path], dict]


def job(name: str, cfg: DictConfig, bb) -> Job:
    if name == "diffseg":
        from diffprobe.tasks import diffseg

        settings = diffseg.settings_of(cfg)
        heads = diffseg.heads_for(bb, settings)
        return Job(name, heads, lambda res, path, image, out: diffseg.write_segmentation(res, heads, settings, path,
                                                                                        image, out))
    if name == "localize":
        from diffprobe.tasks import localize

        head = localize.make_head(bb, localize.settings_of(cfg))
        return Job(name, [head], lambda res, path, image, out: localize.write_localization(res[0], head, path, image,
                                                                                          out))
    from diffprobe.tasks import probe

    settings = probe.settings_of(cfg)
    head = probe.make_head(bb, settings)
    tokens = probe.prompt_tokens(bb, settings.prompt)
    return Job(name, [head], lambda res, path, image, out: probe.write_probe(res[0], head, tokens, Item(str(path), image),
                                                                            out, cfg.model.name))


def settings_of(cfg: DictConfig) -> list[str]:
    """The tasks analyze runs, each task's keys validated (no model needed)."""
    import importlib

    names = list(section(cfg, "analyze", AnalyzeSettings).tasks)
    unknown = [n for n in names if n not in HEADS]
    if not names or unknown or len(set(names)) != len(names):
        raise DiffprobeError(f"analyze.tasks takes distinct tasks among {', '.join(HEADS)}, got {names}")
    for name in names:
        importlib.import_module(f"diffprobe.tasks.{name}").settings_of(cfg)
    return names


def run(cfg: DictConfig, out_dir: Path) -> dict:
    names = settings_of(cfg)
    seed = run_config(cfg).seed
    files = input_images(cfg.get("image"), out_dir)
    bb = load_configured_backbone(cfg)
    jobs = [job(name, cfg, bb) for name in names]
    heads = [h for j in jobs for h in j.heads]

    def write(results: list, path: Path, image, target: Path) -> dict:
        start, out = 0, {}
        for j in jobs:
            out[j.name] = j.write(results[start:start + len(j.heads)], path, image, out_dir / j.name / target.name)
            start += len(j.heads)
        return out

    try:
        return process_with_heads(bb, heads, write, files, out_dir, "analyze", seed, run_fingerprint(cfg))
    finally:
        task_summaries(out_dir, [j.name for j in jobs])


def task_summaries(out_dir: Path, names: list[str]) -> None:
    """Each task's own summary.json in out_dir/<task>/, as its task writes it (folders relative to it), from the
    run's summary.json."""
    if not (out_dir / "summary.json").is_file():
        return
    summary = json.loads((out_dir / "summary.json").read_text())
    for name in names:
        images = {path: {"dir": r["dir"], **r[name]} for path, r in summary["images"].items()}
        save_json(out_dir / name / "summary.json", {**summary, "task": name, "images": images})
