"""Task train_mini: train diffprobe-mini on the procedural world and export a diffusers pipeline.

    python -m diffprobe task=train_mini                      # full run (about 90 min on 1 CPU thread)
    python -m diffprobe task=train_mini train_mini.work_dir=runs/mini   # resumable: rerun to continue
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from diffprobe.errors import DiffprobeError
from diffprobe.io import save_json
from diffprobe.mini.train import TrainConfig, train_mini


def run(cfg, out_dir: Path) -> dict:
    values = OmegaConf.to_container(cfg.get("train_mini"), resolve=True) if cfg.get("train_mini") else {}
    if not isinstance(values, dict):
        raise DiffprobeError("train_mini must be a mapping of training settings")
    work_dir = Path(values.pop("work_dir", None) or out_dir / "work")
    export_to = Path(values.pop("export_to", None) or out_dir / "pipeline")
    values.setdefault("seed", int(cfg.get("seed", 0) or 0))
    train_cfg = TrainConfig.from_dict(values)
    result = train_mini(train_cfg, work_dir, export_to)
    save_json(out_dir / "results.json", result)
    return result
