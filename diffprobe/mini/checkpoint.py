"""Training checkpoints as safetensors: module weights, EMA weights, AdamW state, step and loss history."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffprobe.errors import DiffprobeError
from diffprobe.io import load_tensors, save_tensors
from diffprobe.training import load_optimizer_tensors, optimizer_tensors


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    step: int, losses: dict[str, list[float]], ema: dict[str, torch.Tensor] | None = None,
                    config: dict | None = None) -> None:
    """One file: "<module>.<param>" weights, "ema.<key>", "opt.<i>.<state>", metadata {step, losses, config (the
    run's settings, for the resume check)}."""
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in (ema or {}).items()})
    tensors.update(optimizer_tensors(optimizer, "opt."))
    save_tensors(path, tensors, metadata={"step": str(step), "losses": json.dumps(losses),
                                          "config": json.dumps(config or {})})


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor] | None = None) -> tuple[int, dict[str, list[float]], dict]:
    """Restore what save_checkpoint wrote into the given objects; returns (step, {loss name: values}, the saved
    settings ({} for a checkpoint of an earlier release)).

    A checkpoint of another architecture or an older layout raises DiffprobeError naming the file.
    """
    tensors, meta = load_tensors(path)
    losses = json.loads(meta.get("losses", "null"))
    try:
        if not isinstance(losses, dict):
            raise ValueError("it predates per-loss histories")
        for name, m in modules.items():
            prefix = f"{name}."
            m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        if ema is not None:
            for k in ema:
                ema[k].copy_(tensors[f"ema.{k}"])
        load_optimizer_tensors(optimizer, tensors, "opt.")
    except (RuntimeError, KeyError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise DiffprobeError(f"checkpoint {path} does not fit this training run ({reason}); use another "
                             "train_mini.work_dir or delete it") from None
    return int(meta["step"]), losses, json.loads(meta.get("config", "{}"))
