"""A run folder belongs to one run: creating it, the lock that holds it, and safe file names from user text.

    notice = hold(folder)        # None, or a line saying a dead run's lock was taken over
    ...                          # the run writes into folder
    release(folder)

The lock is `folder/.diffprobe.lock`, a JSON record of its holder (pid, host, start time, command). A second
run on the same folder is refused with one line naming the holder; a lock whose process is gone (same host)
is stale and taken over. The processes of one multi-process launch (torchrun, accelerate) share the lock:
its pid is their launcher's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import time
import unicodedata
from pathlib import Path

from diffprobe.errors import DiffprobeError
from diffprobe.io import new_file_mode

LOCK_NAME = ".diffprobe.lock"
MAX_NAME = 80  # characters of a name made from user text (file systems allow 255 bytes)
_held: set[Path] = set()


def make_run_dir(folder: str | os.PathLike, what: str = "run folder") -> Path:
    """Create `folder` (and its parents) if needed and check that files can be written there; any failure is a
    DiffprobeError naming the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DiffprobeError(f"the {what} {folder} is an existing file, not a folder: choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".diffprobe-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise DiffprobeError(f"cannot write into the {what} {folder}: {exc.strerror or exc}") from None
    return folder


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process `pid` (Linux), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _leader() -> int:
    """The pid that owns the lock: this process, or the launcher of a multi-process run."""
    from diffprobe import distributed

    return os.getppid() if distributed.launched() else os.getpid()


def _record() -> dict:
    pid = _leader()
    return {"pid": pid, "start": _process_start(pid), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(["diffprobe", *sys.argv[1:]])[:300]}


def _describe(info: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')}, started {when}: {info.get('command', '?')}"


def _read(path: Path) -> dict | None:
    """The lock's record; None when it cannot be read (being written, or damaged), after a short wait."""
    for _ in range(10):
        try:
            info = json.loads(path.read_text())
            if isinstance(info, dict) and isinstance(info.get("pid"), int):
                return info
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return None


def hold(folder: str | os.PathLike) -> str | None:
    """Take the lock of `folder` for this run (idempotent in one process). Returns a notice when a dead run's
    lock was taken over; raises DiffprobeError when a live run holds it."""
    folder = Path(folder).resolve()
    if folder in _held:
        return None
    path, mine, notice = folder / LOCK_NAME, _record(), None
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, new_file_mode())
        except FileExistsError:
            info = _read(path)
            if info == {}:  # removed meanwhile: try again
                continue
            if info is not None and all(info.get(k) == mine[k] for k in ("pid", "start", "host")):
                break  # another process of this launch took it
            if info is not None and (info.get("host") != mine["host"] or _alive(info["pid"], info.get("start"))):
                raise DiffprobeError(
                    f"{folder} is in use by another run ({_describe(info)}); wait for it to end or choose another "
                    f"folder with hydra.run.dir=DIR (if that run is dead, delete {path})")
            try:  # stale: move it aside (only one of several takers succeeds), then create ours
                os.replace(path, path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
                os.unlink(path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
            except FileNotFoundError:
                continue
            notice = (f"took over {folder}: the run that held it ({_describe(info)}) is no longer running"
                      if info else f"took over {folder}: its lock file was unreadable")
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        break
    else:
        raise DiffprobeError(f"could not take the lock {path}: other runs keep taking it")
    _held.add(folder)
    return notice


def holds(folder: str | os.PathLike) -> bool:
    """True when this process holds the lock of `folder`."""
    return Path(folder).resolve() in _held


def release(folder: str | os.PathLike) -> None:
    """Remove the lock of `folder` if this run holds it (rank 0 of a multi-process launch removes it)."""
    from diffprobe import distributed

    folder = Path(folder).resolve()
    if folder not in _held:
        return
    _held.discard(folder)
    path = folder / LOCK_NAME
    info = _read(path)
    if info and info.get("pid") == _leader() and distributed.shard()[0] == 0:
        path.unlink(missing_ok=True)


def safe_name(text: str, limit: int = MAX_NAME) -> str:
    """A file name made from user text: letters, digits, `_`, `-` and `.` only (separators, NUL, control
    characters and spaces become `_`), no leading dot, at most `limit` characters (a long name is cut and
    ends with a hash of the whole text, so different long texts stay different)."""
    name = unicodedata.normalize("NFKC", str(text))
    name = re.sub(r"[^\w.-]+", "_", name, flags=re.UNICODE).lstrip("._") or "_"
    if len(name) > limit:
        digest = hashlib.sha1(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = f"{name[:limit - 9]}-{digest}"
    return name


def unique_names(texts: list[str], limit: int = MAX_NAME) -> list[str]:
    """safe_name of each text, made distinct (also ignoring case, for case-insensitive file systems) by a hash
    of the text where two would meet."""
    names = [safe_name(t, limit) for t in texts]
    counts: dict[str, int] = {}
    for n in names:
        counts[n.lower()] = counts.get(n.lower(), 0) + 1
    out, seen = [], set()
    for text, name in zip(texts, names):
        if counts[name.lower()] > 1 or name.lower() in seen:
            digest = hashlib.sha1(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:8]
            name = f"{name[:limit - 9]}-{digest}"
        seen.add(name.lower())
        out.append(name)
    return out


def image_folders(files: list[Path]) -> list[str]:
    """The folder name of each input image in a folder run: its stem made safe, with no dots (so it never meets a
    run-level file such as summary.json); images sharing a stem (x.png, x.jpg) get their suffix too (x_png,
    x_jpg)."""
    stems = [safe_name(Path(f).stem).replace(".", "_") for f in files]
    taken: dict[str, int] = {}
    for s in stems:
        taken[s.lower()] = taken.get(s.lower(), 0) + 1
    texts = [f"{s}_{Path(f).suffix.lstrip('.')}" if taken[s.lower()] > 1 else s for s, f in zip(stems, files)]
    return [n.replace(".", "_") for n in unique_names(texts)]
