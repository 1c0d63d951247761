"""How much memory a run may use, and a one-line refusal before starting one that cannot fit."""

from __future__ import annotations

import os

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
        raise DiffprobeError(f"{what} needs about {needed / GIB:.1f} GiB but {available / GIB:.1f} GiB is available; "
                             f"{remedy}")
