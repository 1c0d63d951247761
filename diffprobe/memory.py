"""How much memory a run may use, and a one-line refusal before starting one that cannot fit; the peak of a
module call's activations from a dry run on fake tensors."""

from __future__ import annotations

import json
import os
import struct
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from diffprobe.errors import DiffprobeError

GIB = 2**30


def available_bytes() -> int:
    """Memory the system can give this process now (MemAvailable on Linux, else the physical total)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(needed: int, what: str, remedy: str, available: int | None = None) -> None:
    """Raise a DiffprobeError naming the estimate, what is available and the remedy when `needed` bytes
    exceed what is available."""
    available = available_bytes() if available is None else available
    if needed > available:
        raise DiffprobeError(f"{what} needs about {_size(needed)} but {_size(available)} is available; {remedy}")


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def weights_bytes(folders: list[Path], dtype: torch.dtype) -> int:
    """Bytes the safetensors weights in `folders` take once loaded with floats in `dtype`, read from the files'
    headers alone (nothing is loaded)."""
    total, width = 0, torch.finfo(dtype).bits // 8
    for folder in folders:
        for path in Path(folder).glob("*.safetensors"):
            with open(path, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                start, end = entry["data_offsets"]
                if entry["dtype"] in FLOAT_DTYPES:
                    numel = 1
                    for n in entry["shape"]:
                        numel *= n
                    total += numel * width
                else:
                    total += end - start
    return total


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages an op creates and that are still referenced, and their peak. Storages that
    exist before (weights, inputs: `known`) are not counted."""

    def __init__(self, known: list[torch.Tensor]):
        super().__init__()
        self.now = self.peak = 0
        self.refs = {id(t.untyped_storage()): None for t in known}

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.refs:
            return
        size = storage.nbytes()

        def freed(_, key=key, size=size):
            self.now -= size
            self.refs.pop(key, None)

        self.refs[key] = weakref.ref(storage, freed)
        self.now += size
        self.peak = max(self.peak, self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._count(value)
        return out


def forward_peak_bytes(build: Callable[[], nn.Module], inputs: Callable[[], dict]) -> int:
    """Peak bytes of the activations one no-grad call `build()(**inputs())` holds at once, found by a dry run on
    fake tensors (nothing is allocated or computed: a published-size denoiser takes seconds); the module's own
    weights and the inputs are not counted."""
    with FakeTensorMode():
        model, kwargs = build(), inputs()
        known = list(model.parameters()) + list(model.buffers()) + [v for v in kwargs.values()
                                                                     if isinstance(v, torch.Tensor)]
        with torch.no_grad(), _LiveBytes(known) as live:
            model(**kwargs)
    return live.peak
