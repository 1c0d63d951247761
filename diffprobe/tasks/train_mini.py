"""Task train_mini: train diffprobe-mini on the procedural world and export a diffusers pipeline.

    python -m diffprobe task=train_mini                      # full run (about 90 min on 1 CPU thread)
    python -m diffprobe task=train_mini train_mini.work_dir=runs/mini   # resumable: rerun to continue
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from diffprobe.errors import DiffprobeError
from diffprobe.io import allow_writes, save_json
from diffprobe.training.mini import MiniTrainSettings, train_mini
from diffprobe.runfolder import hold, make_run_dir

log = logging.getLogger(__name__)


def settings_of(cfg) -> tuple[MiniTrainSettings, str | None, str | None]:
    """The train_mini.* keys, validated: the training settings, work_dir and export_to (None: in the run folder)."""
    values = OmegaConf.to_container(cfg.get("train_mini"), resolve=True) if cfg.get("train_mini") else {}
    if not isinstance(values, dict):
        raise DiffprobeError("train_mini must be a mapping of training settings")
    work_dir, export_to = values.pop("work_dir", None), values.pop("export_to", None)
    values.setdefault("seed", int(cfg.get("seed", 0) or 0))
    return MiniTrainSettings.from_dict(values), work_dir, export_to


def run(cfg, out_dir: Path) -> dict:
    train_cfg, work_dir, export_to = settings_of(cfg)
    work_dir = Path(work_dir or out_dir / "work")
    export_to = Path(export_to or out_dir / "pipeline")
    if not work_dir.resolve().is_relative_to(out_dir.resolve()):  # a shared work_dir is held like a run folder
        make_run_dir(work_dir, "train_mini.work_dir folder")
        note = hold(work_dir)
        if note:
            log.warning(note)
    make_run_dir(export_to.parent, "train_mini.export_to parent folder")
    allow_writes(work_dir)
    allow_writes(export_to.parent)  # the pipeline is built beside export_to, then swapped in
    result = train_mini(train_cfg, work_dir, export_to)
    save_json(out_dir / "results.json", result)
    return result
