"""How a head's pass is made, one name per knob for every head: the timestep, noise, prompt and the image
the model sees (size, crop, resize filter). Each head's settings extend CallSettings with their own keys,
so two heads of one run can want different timesteps."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from diffprobe.data.images import RESIZE_FILTERS, center_square, image_to_tensor
from diffprobe.drives import Drive
from diffprobe.errors import DiffprobeError

CROPS = ("center", "none")
WIDE = 2.0  # aspect ratio beyond which a centre crop leaves most of the image out
log = logging.getLogger(__name__)


@dataclass
class CallSettings:
    """timestep: of the one denoiser call; noise: noise the latent to it first (seeded) or feed it clean;
    prompt: the text conditioning; image_size: side of the square the model sees (None: the model's);
    crop: "center" (the centre square) or "none" (the whole image squashed); resize: a filter of
    diffprobe.data.images.RESIZE_FILTERS."""

    LIMITS: ClassVar[dict] = {"image_size": "8..16384"}  # timestep: checked against the model's schedule

    timestep: int = 0
    noise: bool = False
    prompt: str = ""
    image_size: int | None = None
    crop: str = "center"
    resize: str = "bicubic"

    def validate(self) -> None:
        if self.crop not in CROPS:
            raise DiffprobeError(f"crop must be one of {', '.join(CROPS)}, not {self.crop!r}")
        if self.resize not in RESIZE_FILTERS:
            raise DiffprobeError(f"resize must be one of {', '.join(RESIZE_FILTERS)}, not {self.resize!r}")

    def drive(self) -> Drive:
        return Drive("one_step", timestep=int(self.timestep), noise=bool(self.noise))


def analysed_box(width: int, height: int, crop: str) -> tuple[int, int, int, int]:
    """(left, top, box width, box height) of the part of a width x height image that is analysed."""
    if crop == "center":
        left, top, side = center_square(width, height)
        return left, top, side, side
    return 0, 0, width, height


def output_size(item, crop: str) -> tuple[int, int]:
    """(H, W) a head's pixel results are made at: item.data["output_size"] if the task sets it, else the
    analysed box of item.image."""
    if "output_size" in item.data:
        return tuple(item.data["output_size"])
    _, _, bw, bh = analysed_box(item.image.width, item.image.height, crop)
    return bh, bw


def model_input(image, size: int, crop: str, resize: str) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(1, 3, size, size) tensor in [-1, 1] of a PIL image as the model sees it, and the analysed box."""
    box = analysed_box(image.width, image.height, crop)
    left, top, bw, bh = box
    if crop == "center" and max(image.width, image.height) > WIDE * min(image.width, image.height):
        log.warning("the image is %d x %d px: only its centre square (%.0f %% of it) is analysed; crop=none "
                    "analyses the whole image squashed to a square", image.width, image.height,
                    100 * bw * bh / (image.width * image.height))
    return image_to_tensor(image.crop((left, top, left + bw, top + bh)), size, crop="none", resize=resize), box
