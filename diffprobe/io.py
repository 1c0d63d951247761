"""Whole-or-nothing file output: every writer goes through a temporary file and an atomic rename, and the
file ends up with the permissions the user's umask gives a new file (mkstemp alone would make it 0600)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def new_file_mode() -> int:
    """0666 minus the process umask: the mode open() gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success give it the umask's mode and rename it onto `path`,
    on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, new_file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # torch tensors without importing torch here
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically. numpy/torch values become lists and numbers."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return Path(path)


def save_png(path: str | os.PathLike, image: "np.ndarray | Any") -> Path:
    """Write a PNG atomically from a uint8 array (H, W), (H, W, 3) or (H, W, 4), uint16 (H, W), or a PIL image."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def save_figure(path: str | os.PathLike, fig: Any, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write a dict of torch tensors as safetensors atomically (tensors made contiguous, on CPU)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
    return Path(path)


def load_tensors(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """Read a safetensors file into CPU tensors and its metadata; a missing or corrupt file is a DiffprobeError."""
    from safetensors import safe_open

    from diffprobe.errors import DiffprobeError

    path = Path(path)
    if not path.is_file():
        raise DiffprobeError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise DiffprobeError(f"{path} is not a readable safetensors file ({exc})") from None
    return tensors, meta
