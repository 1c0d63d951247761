"""The one training loop of the three trainers (keypoint embeddings, the hyperfeature aggregator, diffprobe-mini).

    done = run_steps("keypoints fit", start, total, step, save, every=50, minutes=5.0)

step(i) computes step i (forward, backward) and returns (apply, losses): apply() makes the update (the optimiser
step, the history row) and runs with Ctrl-C deferred, so a step is whole or absent. save(done, scheduled) writes a
checkpoint: every `every` steps and at the end (scheduled=True: where a trainer also validates), every `minutes`
(scheduled=False), and on Ctrl-C after the last whole step. After the first step, a run that will take long says
so. Checkpoints have one format (checkpoint.py), and resuming one follows the item loops' rule
(items.check_fingerprint): other settings are refused naming the keys that differ, except the schedule's
(SCHEDULE: how many steps, how often to save or validate), which may change between runs.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from tqdm.auto import tqdm

from diffprobe.items import deferred_interrupt, warn_if_long

log = logging.getLogger(__name__)
SCHEDULE = ("steps", "train_steps", "unet_steps", "vae_steps", "checkpoint_every", "checkpoint_minutes", "val_every",
            "max_minutes", "threads", "samples")


def optimizer_tensors(optimizer, prefix: str = "") -> dict:
    """An optimiser's per-parameter state as flat tensors "<prefix><param index>.<name>" (Adam's moments and
    step), for a checkpoint's safetensors file; its param_groups (plain numbers) go to the JSON side."""
    import torch

    return {f"{prefix}{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
            for i, state in optimizer.state_dict()["state"].items() for k, v in state.items()}


def load_optimizer_tensors(optimizer, tensors: dict, prefix: str = "", param_groups: list | None = None) -> None:
    """Restore what optimizer_tensors wrote (the entries under `prefix`); param_groups None: the optimiser's own."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            i, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state,
                               "param_groups": optimizer.state_dict()["param_groups"] if param_groups is None
                               else param_groups})


def run_steps(what: str, start: int, total: int, step: Callable[[int], tuple[Callable[[], None], dict]],
              save: Callable[[int, bool], None] | None, every: int, minutes: float, hint: str = "",
              progress: bool = True, main: bool = True, deadline: float | None = None) -> int:
    """Steps start .. total - 1 of a training run; returns the number of steps done (total, or fewer when
    `deadline` (a time.time()) passed first). `main`: this process saves (the first of a data-parallel run);
    save None: nothing is saved. Losses shown on the progress bar are the step's."""
    bar = tqdm(range(start, total), desc=what, initial=start, total=total, disable=not progress or not main)
    last, done, saved = time.time(), start, start
    try:
        for i in bar:
            if deadline is not None and time.time() > deadline:
                log.warning("%s: time limit reached at step %d of %d", what, done, total)
                break
            apply, losses = step(i)
            with deferred_interrupt():
                apply()
                done = i + 1
            if done == start + 1:
                warn_if_long(what, time.time() - last, total - done, hint)
            bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()})
            scheduled = done % every == 0 or done == total
            if main and save is not None and (scheduled or time.time() - last >= 60 * minutes):
                save(done, scheduled)
                last, saved = time.time(), done
    except KeyboardInterrupt:
        if main and save is not None and done > saved:
            save(done, False)
            log.warning("%s interrupted after step %d: rerun in the same folder to continue", what, done)
        raise
    if main and save is not None and done > saved:  # stopped by the deadline
        save(done, True)
    return done
