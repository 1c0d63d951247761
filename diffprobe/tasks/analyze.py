"""task=analyze tasks=[...]: several heads over the same images, one denoiser pass per image for the heads whose drives
agree (DiffSeg and localize share t=300 on the clean latent by default; probe shares it with
probe.timestep=300). Each head writes exactly the files its own task writes, in out_dir/<head>/, with its own
summary.json; every head's keys are its task's (diffseg.*, localize.*, probe.*).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from diffprobe.config import section
from diffprobe.errors import DiffprobeError
from diffprobe.io import save_json
from diffprobe.tasks.image_runs import Job, run_job

HEADS = ("diffseg", "localize", "probe", "keypoints", "hyperfeatures")


@dataclass
class AnalyzeSettings:
    tasks: list = field(default_factory=lambda: ["diffseg", "localize"])


def settings_of(cfg: DictConfig) -> list[str]:
    """The tasks analyze runs, each task's keys validated (no model needed)."""
    names = list(section(cfg, "analyze", AnalyzeSettings).tasks)
    unknown = [n for n in names if n not in HEADS]
    if not names or unknown or len(set(names)) != len(names):
        raise DiffprobeError(f"analyze.tasks takes distinct tasks among {', '.join(HEADS)}, got {names}")
    for name in names:
        importlib.import_module(f"diffprobe.tasks.{name}").settings_of(cfg)
    return names


def job(cfg: DictConfig, bb) -> Job:
    """Every named task's job in one: their heads side by side (one pass where their drives agree); each task
    writes its files in out_dir/<task>/<image folder>/ and its record under the task's name."""
    names = settings_of(cfg)
    jobs = {name: importlib.import_module(f"diffprobe.tasks.{name}").job(cfg, bb) for name in names}

    def write(results: list, path: Path, image, target: Path) -> dict:
        start, out = 0, {}
        for name, j in jobs.items():
            out[name] = j.write(results[start:start + len(j.heads)], path, image, target.parent / name / target.name)
            start += len(j.heads)
        return out

    return Job([h for j in jobs.values() for h in j.heads], write)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    names = settings_of(cfg)
    try:
        return run_job(cfg, out_dir, "analyze")
    finally:
        task_summaries(out_dir, names)


def task_summaries(out_dir: Path, names: list[str]) -> None:
    """Each task's own summary.json in out_dir/<task>/, as its task writes it (folders relative to it), from the
    run's summary.json."""
    if not (out_dir / "summary.json").is_file():
        return
    summary = json.loads((out_dir / "summary.json").read_text())
    for name in names:
        images = {path: {"dir": r["dir"], **r[name]} for path, r in summary["images"].items()}
        save_json(out_dir / name / "summary.json", {**summary, "task": name, "images": images})
