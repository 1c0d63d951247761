"""diffprobe-mini: a small text-to-image latent diffusion model trained on the procedural world.

The trained pipeline ships as package data in diffusers layout (diffprobe/assets/mini) and loads
through diffprobe.loading.load_backbone like any Stable Diffusion directory.
"""

from __future__ import annotations

from pathlib import Path

from diffprobe.errors import DiffprobeError

PACKAGED = Path(__file__).resolve().parent.parent / "assets" / "mini"


def packaged_path() -> Path:
    """The directory of the shipped diffprobe-mini pipeline (model_index.json, unet/, vae/, ...)."""
    if not (PACKAGED / "model_index.json").is_file():
        raise DiffprobeError(f"the packaged diffprobe-mini weights are missing from {PACKAGED}; reinstall diffprobe "
                             "or train them with `python -m diffprobe task=train_mini`")
    return PACKAGED
