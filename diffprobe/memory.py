"""How much memory a run will use, and a one-line refusal before starting one that cannot fit: weights and the
loading peak from safetensors headers, the resident memory once mapped weights are read, and the peak of a call's
activations from a dry run on fake tensors."""

from __future__ import annotations

import json
import math
import os
import struct
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

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
        raise DiffprobeError(f"{what} needs about {size_text(needed)} but {size_text(available)} is available; {remedy}")


def size_text(n: int) -> str:
    """Bytes as MiB under a GiB, else GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _part_bytes(folder: Path, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes stored, bytes once loaded with floats in `dtype`) of the safetensors weights in `folder`, read from
    the files' headers alone."""
    stored = loaded = 0
    width = torch.finfo(dtype).bits // 8
    for path in Path(folder).glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            stored += end - start
            loaded += math.prod(entry["shape"]) * width if entry["dtype"] in FLOAT_DTYPES else end - start
    return stored, loaded


def weights_bytes(folders: list[Path], dtype: torch.dtype) -> int:
    """Bytes the safetensors weights in `folders` take once loaded with floats in `dtype` (headers only)."""
    return sum(_part_bytes(folder, dtype)[1] for folder in folders)


def loading_peak_bytes(folders: list[Path], dtype: torch.dtype) -> int:
    """Peak bytes loading the parts in `folders`, in order, adds to a process: a part stored in `dtype` is used
    from its mapped file; one stored in another dtype is read whole while its converted copy is made, so the file
    and the copy are resident at once until that part is loaded (headers only)."""
    held = peak = 0
    for folder in folders:
        stored, loaded = _part_bytes(folder, dtype)
        peak = max(peak, held + (loaded if stored == loaded else stored + loaded))
        held += loaded
    return peak


def _storages(values) -> list:
    """The storages of the tensors in a nest of values (a sparse COO tensor's: its indices' and values')."""
    out = []
    for value in tree_flatten(values)[0]:
        if isinstance(value, torch.Tensor):
            parts = (value._indices(), value._values()) if value.layout == torch.sparse_coo else (value,)
            out.extend(part.untyped_storage() for part in parts)
    return out


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages operators create and that are still referenced, and their peak. A storage an
    operator reads before any operator made it (weights, inputs, a view of either) existed before and is not
    counted."""

    def __init__(self, fake: FakeTensorMode | None = None):
        super().__init__()
        self.now = self.peak = 0
        self.refs: dict[int, object] = {}
        self.fake = fake   # real tensors an operator reads become its (memoised) fake tensors first

    def _as_fake(self, value):
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return self.fake.from_tensor(value)
        return value

    def _count(self, storage) -> None:
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
        kwargs = kwargs or {}
        if self.fake is not None:
            args, kwargs = tree_map(self._as_fake, (args, kwargs))
        for storage in _storages((args, kwargs)):   # held, so that their ids are not reused by new storages
            self.refs.setdefault(id(storage), storage)
        out = func(*args, **kwargs)
        for storage in _storages(out):
            self._count(storage)
        return out


def forward_peak_bytes(call: Callable[..., object], build: Callable[[], object] | None = None,
                       grad: bool = False) -> int:
    """Peak bytes of the tensors `call()` creates and holds at once, found by a dry run on fake tensors: the
    tensors `call` makes are fake and the real ones it reads are read as fake, so nothing is allocated or
    computed (a published-size denoiser takes seconds). `build()`, when given, runs first in the same fake mode,
    uncounted, and `call(built)` gets what it returns (a model rebuilt from its config on fake weights).
    Tensors that exist before the call are not counted; inputs `call` builds are. With `grad`, autograd records
    what `call` does (a call that runs its own backward then counts the saved tensors and the gradients too)."""
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        args = () if build is None else (build(),)
        with torch.set_grad_enabled(grad), _LiveBytes(fake) as live:
            call(*args)
    return live.peak


def rss_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def resident_when_weights_read() -> int:
    """This process's resident memory once every memory-mapped weight file has been read: what is resident now,
    with each mapped .safetensors file counted whole (weights loaded by mapping their file, as diffusers and
    transformers do when no dtype conversion is needed, are read from disk only as the model first runs)."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return rss_bytes()
    total, name, size = 0, "", 0
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        if not fields[0].endswith(":"):            # a mapping's header: address perms offset dev inode [path]
            name = fields[5] if len(fields) > 5 else ""
        elif fields[0] == "Size:":
            size = int(fields[1]) * 1024
        elif fields[0] == "Rss:":
            total += size if name.endswith(".safetensors") else int(fields[1]) * 1024
    return total


MMAP_THRESHOLD = 4 * 2**20   # bytes: allocations this large get their own mapping, unmapped when freed


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have the C library serve allocations of `threshold` bytes or more from their own mappings, given back to the
    system as soon as they are freed. glibc's default starts so but raises the threshold (up to 32 MiB) each time
    such a block is freed; after that, freed activations stay in its heap between the live ones, and a process can
    hold far more than it uses (SD3-medium's keypoint fit at 512 px: 23.4 GB resident against 9.5 GB with this;
    docs/scale.md). True when set; False where the C library is not glibc (it keeps its own policy)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))   # -3: M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        return False
