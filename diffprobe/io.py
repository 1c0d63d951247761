"""Whole-or-nothing file output: every writer goes through a temporary file and an atomic rename, and the
file ends up with the permissions the user's umask gives a new file (mkstemp alone would make it 0600).

Inside `confined(run_dir)` (the command line wraps every task in it) a write outside the run folder, or outside
a folder the task named with `allow_writes` (world.out, train_mini.export_to), is refused. JSON is strict:
NaN and infinities are written as null.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

_roots: list[Path] | None = None  # folders writes may go to; None: anywhere (library use)


@contextlib.contextmanager
def confined(*roots: str | os.PathLike) -> Iterator[None]:
    """Within the block, every write through this module must land inside one of `roots`."""
    global _roots
    previous, _roots = _roots, [Path(os.path.realpath(r)) for r in roots]
    try:
        yield
    finally:
        _roots = previous


def allow_writes(folder: str | os.PathLike) -> None:
    """Let the current confined block also write inside `folder` (an output folder the user named)."""
    if _roots is not None:
        _roots.append(Path(os.path.realpath(folder)))


def check_inside(path: str | os.PathLike) -> Path:
    """`path` if a write there is allowed (see confined), else a DiffprobeError."""
    from diffprobe.errors import DiffprobeError

    real = Path(os.path.realpath(path))
    if _roots is not None and not any(real == r or r in real.parents for r in _roots):
        raise DiffprobeError(f"refusing to write {path}: it is outside the run folder {_roots[0]}")
    return Path(path)

def new_file_mode() -> int:
    """0666 minus the process umask: the mode open() gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success give it the umask's mode and rename it onto `path`,
    on error delete it."""
    path = check_inside(path)
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


def json_value(obj: Any) -> Any:
    """`obj` as plain JSON values: numpy/torch values become lists and numbers, paths strings, tuples lists, and
    NaN or infinite floats null (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_value(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)) or (hasattr(obj, "tolist") and not isinstance(obj, (str, bytes))):
        return json_value(obj.tolist())  # numpy, and torch tensors without importing torch here
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented strict JSON (see json_value), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_value(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)


def save_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
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
