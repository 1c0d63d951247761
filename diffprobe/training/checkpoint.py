"""The one checkpoint format of the three trainers: a single safetensors file.

Tensors: the trainer's state as given ("<module>.<param>", "ema.<key>", "embeddings", ...) and the optimiser's
per-parameter state as "opt.<param index>.<name>". Metadata (JSON strings): "format", "step", "history" (the
trainer's loss and validation records), "config" (the run's settings, for the one resume rule:
items.check_fingerprint) and "param_groups" (the optimiser's numbers, e.g. learning rates).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.io import load_tensors, save_tensors
from diffprobe.items import check_fingerprint
from diffprobe.training.loop import SCHEDULE, load_optimizer_tensors, optimizer_tensors

FORMAT = "diffprobe-checkpoint-1"


@dataclass
class Checkpoint:
    """What `load_checkpoint` read: the trainer's tensors (optimiser entries removed), step, history, settings."""

    tensors: dict[str, torch.Tensor]
    step: int
    history: dict
    config: dict


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, step: int,
                    history: dict, config: dict) -> Path:
    """Write one checkpoint file (whole or absent: diffprobe.io writes atomically)."""
    everything = {k: v.detach() for k, v in tensors.items()}
    everything.update(optimizer_tensors(optimizer, "opt."))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    save_tensors(path, everything, metadata={"format": FORMAT, "step": str(step), "history": json.dumps(history),
                                             "config": json.dumps(config), "param_groups": json.dumps(groups)})
    return Path(path)


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer, config: dict) -> Checkpoint:
    """Read a checkpoint, check it was made with `config` (the one resume rule: only the schedule's keys may
    differ), restore the optimiser's state; the caller restores its own tensors from the result.

    A file of another format (or of an earlier release) raises DiffprobeError naming it."""
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT:
        raise DiffprobeError(f"{path} is not a diffprobe training checkpoint (or is from an earlier release); use "
                             "another output folder to start afresh")
    check_fingerprint(json.loads(meta["config"]), config, Path(path).parent, may_change=SCHEDULE)
    try:
        groups = [{**g, **saved} for g, saved in zip(optimizer.state_dict()["param_groups"],
                                                       json.loads(meta["param_groups"]))]
        load_optimizer_tensors(optimizer, tensors, "opt.", param_groups=groups)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise DiffprobeError(f"checkpoint {path} does not fit this training run "
                             f"({str(exc).strip().splitlines()[0]}); use another output folder") from None
    own = {k: v for k, v in tensors.items() if not k.startswith("opt.")}
    return Checkpoint(own, int(meta["step"]), json.loads(meta["history"]), json.loads(meta["config"]))


def restore(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    """Load a module's weights saved under "<prefix>."; a checkpoint of another architecture is refused."""
    try:
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    except RuntimeError as exc:
        raise DiffprobeError(f"checkpoint {path} does not fit this training run "
                             f"({str(exc).strip().splitlines()[0]}); use another output folder") from None


def module_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The "<name>.<param>" tensors of several modules."""
    return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
