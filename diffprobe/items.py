"""The one loop over items (the rows of a dataset, the image files of a folder run): progress, checkpoints by
count and by time, resume, shards.

Metrics keep their whole state as a dict of arrays that add up (`state`, `load_state`, `result`; each metric's
own update method takes an item's values): per-image counts summed, per-item rows filled in an (N, ...) array
with a mask. So a resumed run continues
exactly, and shards of a run are reduced by adding their states.

    run_items(len(dataset), process, metrics, out_dir, fingerprint, checkpoint_every=25)

The state goes to out_dir/<name>_state.safetensors (+ .json holding the settings fingerprint and what is
done). Rerunning in the same folder resumes; `resume=DIR` continues another folder's run with the same
settings. A different fingerprint is refused with the keys that differ.

Launched over several processes (`accelerate launch`, `torchrun`: diffprobe.distributed), process r of w
takes the items i with i % w == r and keeps its shard in out_dir/<name>_rank<r>of<w>_state.*; when every
process is done, each adds all shards' states (sums of per-item counts, disjoint rows), so the metrics
equal a one-process run's. A folder holding the run over another number of processes is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from diffprobe.errors import DiffprobeError
from diffprobe.io import load_tensors, save_json, save_tensors

log = logging.getLogger(__name__)


class Metric(Protocol):
    """A metric whose state is a dict of arrays that add up over items (and over shards)."""

    def state(self) -> dict[str, np.ndarray]: ...

    def load_state(self, state: dict[str, np.ndarray]) -> None: ...

    def result(self) -> dict: ...


class IndexedRows:
    """Per-item arrays kept in an (N, *shape) array with a `filled` mask: rows of a dataset (found points,
    ground truth, ...) whose states add up over shards. update(i, name=array, ...); each array is
    allocated at its first row."""

    def __init__(self, n: int):
        self.n = n
        self.arrays: dict[str, np.ndarray] = {}
        self.filled = np.zeros(n, np.float64)

    def update(self, i: int, **rows) -> None:
        for k, v in rows.items():
            v = np.asarray(v, np.float64)
            if k not in self.arrays:
                self.arrays[k] = np.zeros((self.n, *v.shape), np.float64)
            self.arrays[k][i] = v
        self.filled[i] = 1.0

    def state(self) -> dict[str, np.ndarray]:
        return {**self.arrays, "filled": self.filled}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.arrays = {k: np.asarray(v, np.float64).copy() for k, v in state.items() if k != "filled"}
        self.filled = np.asarray(state["filled"], np.float64).copy()

    def result(self) -> dict[str, np.ndarray]:
        """The filled rows of every array, in item order."""
        keep = self.filled > 0
        return {k: v[keep] for k, v in self.arrays.items()}


LONG_RUN_MINUTES = 10.0


def warn_if_long(what: str, seconds_per_step: float, steps_left: int, hint: str) -> float:
    """Log a warning (once, after the first step) when the rest of a run will take long on this device;
    returns the estimate in minutes."""
    minutes = seconds_per_step * steps_left / 60
    if minutes > LONG_RUN_MINUTES:
        log.warning("%s: about %.0f minutes to go on this device (%.1f s per step); it checkpoints as it goes "
                    "and a rerun in the same folder continues. %s", what, minutes, seconds_per_step, hint)
    return minutes


def differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def check_fingerprint(saved: dict, current: dict, where: str | Path, may_change: tuple[str, ...] = ()) -> None:
    """The one resume rule (item loops and trainers): refuse to continue a run made with other settings, naming
    the keys that differ, except keys whose last part is in `may_change` (a trainer's schedule)."""
    keys = differing_keys(json.loads(json.dumps(saved, default=str)), json.loads(json.dumps(current, default=str)))
    keys = [k for k in keys if k.rsplit(".", 1)[-1] not in may_change]
    if keys:
        shown = ", ".join(f"{k} ({_get(saved, k)!r} there, {_get(current, k)!r} now)" for k in keys[:3])
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        raise DiffprobeError(f"{where} holds a run with other settings: {shown}{more}; use another output "
                             "folder, or the same settings to continue it")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


class ItemState:
    """What a run over items has done: the metrics' arrays and a done mask, saved as safetensors + JSON."""

    def __init__(self, out_dir: Path, name: str, n: int, metrics: dict[str, Metric], fingerprint: dict,
                 shard: tuple[int, int] = (0, 1)):
        self.out_dir, self.name, self.metrics, self.fingerprint = Path(out_dir), name, metrics, fingerprint
        self.rank, self.world = shard
        self.done = np.zeros(n, bool)
        self.records: dict[int, object] = {}  # JSON rows per item (a commit's return value), if any

    def paths(self, folder: Path, rank: int | None = None) -> tuple[Path, Path]:
        """The state files of this process's shard (of shard `rank`, if given)."""
        rank = self.rank if rank is None else rank
        stem = f"{self.name}_rank{rank}of{self.world}" if self.world > 1 else self.name
        return folder / f"{stem}_state.safetensors", folder / f"{stem}_state.json"

    def check_world(self, folder: Path) -> None:
        """Refuse a folder holding this run over another number of processes."""
        pattern = re.compile(rf"^{re.escape(self.name)}(?:_rank\d+of(\d+))?_state\.json$")
        for path in folder.glob(f"{self.name}*_state.json") if folder.is_dir() else []:
            m = pattern.match(path.name)
            if m and int(m.group(1) or 1) != self.world:
                raise DiffprobeError(f"{folder} holds this run over {int(m.group(1) or 1)} process(es); this one has "
                                     f"{self.world}: rerun with that many processes, or use another output folder")

    def add_shards(self) -> None:
        """Replace the metrics' state by the sum of every shard's saved state (after all processes are done)."""
        totals: dict[str, np.ndarray] = {}
        done = np.zeros(len(self.done), bool)
        for r in range(self.world):
            saved = self._read(self.out_dir, r)
            if saved is None:
                raise DiffprobeError(f"shard {r} of {self.world} left no state in {self.out_dir}: that process "
                                     "failed; rerun the same command to finish it")
            info, tensors = saved
            for k, v in tensors.items():
                totals[k] = totals[k] + v if k in totals else v.copy()
            done |= tensors["done"] > 0
            self.records.update({int(i): rec for i, rec in info.get("records", {}).items()})
        self._load_metrics(totals)
        self.done = done

    def save(self) -> None:
        tensors = {f"{key}.{k}": torch.from_numpy(np.asarray(v, np.float64)) for key, m in self.metrics.items()
                   for k, v in m.state().items()}
        tensors["done"] = torch.from_numpy(self.done.astype(np.float64))
        tensors_path, info_path = self.paths(self.out_dir)
        save_tensors(tensors_path, tensors)
        save_json(info_path, {"fingerprint": self.fingerprint, "done": int(self.done.sum()), "items": len(self.done),
                               "records": {str(i): r for i, r in sorted(self.records.items())}})

    def _read(self, folder: Path, rank: int | None = None) -> tuple[dict, dict[str, np.ndarray]] | None:
        """(info, arrays) of a shard's state saved in `folder` (its fingerprint and item count checked), or None."""
        tensors_path, info_path = self.paths(folder, rank)
        if not info_path.is_file():
            return None
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as exc:
            raise DiffprobeError(f"{info_path} is not valid JSON ({exc}); delete it to start over") from None
        check_fingerprint(info.get("fingerprint", {}), self.fingerprint, folder)
        tensors, _ = load_tensors(tensors_path)
        if tensors["done"].numel() != len(self.done):
            raise DiffprobeError(f"{folder} holds a run over {tensors['done'].numel()} items, this one has "
                                 f"{len(self.done)}")
        return info, {k: v.numpy() for k, v in tensors.items()}

    def _load_metrics(self, arrays: dict[str, np.ndarray]) -> None:
        for key, metric in self.metrics.items():
            metric.load_state({k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(key + ".")})

    def restore(self, folder: Path) -> bool:
        """Load a state from `folder` if it holds one (checking its fingerprint); True when loaded."""
        saved = self._read(folder)
        if saved is None:
            return False
        info, arrays = saved
        self._load_metrics(arrays)
        self.done = arrays["done"] > 0
        self.records = {int(i): r for i, r in info.get("records", {}).items()}
        return True


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C inside the block is delivered when the block ends, so a state update is never half made."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def run_items(n: int, process: Callable[[int], Callable[[], None]], metrics: dict[str, Metric], out_dir: Path,
              fingerprint: dict, name: str = "eval", resume: str | Path | None = None, checkpoint_every: int = 25,
              checkpoint_minutes: float = 5.0, desc: str = "items", shard: tuple[int, int] | None = None,
              on_save: Callable[[ItemState], None] | None = None,
              redo: Callable[[object], bool] | None = None) -> ItemState:
    """For every item i of this shard not yet done, process(i) computes and returns a commit() that applies
    its updates to `metrics` (run with Ctrl-C deferred, so an update is whole) and may return a JSON row
    for the item (kept in state.records); the state is checkpointed every `checkpoint_every` items and
    every `checkpoint_minutes`, at the end and on Ctrl-C, each time followed by on_save(state) in a
    one-process run.

    Resumes from out_dir (a rerun in the same folder) or from `resume`; a resumed item whose record makes
    redo(record) true (an item that failed) is done again. shard=(rank, world): this process takes items i
    with i % world == rank (default: diffprobe.distributed's); with world > 1 the returned state holds every
    shard's items, added once all processes are done.
    """
    from diffprobe import distributed

    rank, world = shard if shard is not None else distributed.shard()
    state = ItemState(out_dir, name, n, metrics, fingerprint, (rank, world))
    if resume and not Path(resume).is_dir():
        raise DiffprobeError(f"resume: {resume} is not a folder of an earlier run")
    for folder in ([Path(resume)] if resume else []) + [Path(out_dir)]:
        state.check_world(folder)
        if state.restore(folder):
            for i, record in list(state.records.items()):
                if redo is not None and redo(record):
                    state.done[i] = False
                    del state.records[i]
            log.info("resuming %s from %s: %d of %d items done", name, folder, int(state.done.sum()), n)
            break
    mine = [i for i in range(rank, n, world)]
    todo = [i for i in mine if not state.done[i]]
    last, since = time.time(), 0
    bar = tqdm(todo, desc=desc, initial=len(mine) - len(todo), total=len(mine), disable=len(mine) < 2)

    def save() -> None:
        with deferred_interrupt():
            state.save()
            if on_save is not None and world == 1:
                on_save(state)

    try:
        for i in bar:
            commit = process(i)
            with deferred_interrupt():
                record = commit()
                if record is not None:
                    state.records[i] = record
                state.done[i] = True
            since += 1
            if since >= checkpoint_every or time.time() - last >= 60 * checkpoint_minutes:
                save()
                last, since = time.time(), 0
    except BaseException:  # Ctrl-C or a failing item: keep what is done
        save()
        raise
    save()
    if world > 1:
        distributed.wait_for_everyone()
        state.add_shards()
    return state
