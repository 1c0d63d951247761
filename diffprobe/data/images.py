"""Reading images from users: any file PIL opens, any mode, any size, with one-line errors for the rest."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from diffprobe.errors import DiffprobeError

log = logging.getLogger(__name__)
TINY_SIDE = 16  # images smaller than this carry almost nothing once resized to a model's size

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open `path` as an 8-bit RGB image, EXIF orientation applied.

    Transparent images are composited on white; 16-bit and float greyscale are rescaled to 8 bits.
    A missing, unreadable or non-image file raises DiffprobeError.
    """
    path = Path(path)
    if not path.exists():
        raise DiffprobeError(f"image not found: {path}")
    if path.is_dir():
        raise DiffprobeError(f"{path} is a folder, not an image")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise DiffprobeError(f"{path} is too large to read safely ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError) as exc:
        raise DiffprobeError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from None
    if min(img.size) < TINY_SIDE:
        log.warning("%s is only %d x %d px: resized to the model's size it carries almost nothing", path, *img.size)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def list_images(path: str | os.PathLike) -> list[Path]:
    """`path` itself if it is a file, else the image files directly inside the folder, sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DiffprobeError(f"image path not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DiffprobeError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
    return files


def center_square(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side) of the largest centred square of a width x height image."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


# Resize filters: the references' own. "bilinear" and "bicubic" are PIL's (antialiased when shrinking; the
# StableKeypoints and Diffusion Hyperfeatures loaders use PIL bilinear); "bilinear_tf" is tf.image.resize's
# default (bilinear, half-pixel centres, no antialiasing, float output: DiffSeg's loader), computed with
# F.interpolate(mode="bilinear", align_corners=False).
RESIZE_FILTERS = ("bilinear", "bicubic", "bilinear_tf")


def check_resize(name: str) -> str:
    if name not in RESIZE_FILTERS:
        raise DiffprobeError(f"resize must be one of {', '.join(RESIZE_FILTERS)}, not {name!r}")
    return name


def image_to_tensor(img: Image.Image, size: int | tuple[int, int], crop: str = "center",
                    resize: str = "bicubic") -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float tensor in [-1, 1].

    crop="center": centre-crop to a square (see center_square), then resize to size x size;
    crop="none": resize the whole image to `size` ((H, W) or a side), aspect not kept.
    resize: one of RESIZE_FILTERS.
    """
    if crop == "center":
        left, top, side = center_square(*img.size)
        img = img.crop((left, top, left + side, top + side))
    elif crop != "none":
        raise ValueError(f"crop must be 'center' or 'none', not {crop!r}")
    h, w = (size, size) if isinstance(size, int) else size
    if check_resize(resize) == "bilinear_tf":
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)[None]
        if arr.shape[-2:] != (h, w):
            arr = F.interpolate(arr, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        return arr / 127.5 - 1.0
    img = img.resize((w, h), Image.BILINEAR if resize == "bilinear" else Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return (arr / 127.5 - 1.0).unsqueeze(0)


def size_of(image: Image.Image) -> dict[str, int]:
    """An image's size as every output file writes it: {"width": W, "height": H} in pixels."""
    return {"width": image.width, "height": image.height}
