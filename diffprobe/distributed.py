"""Runs over several processes (`accelerate launch` or `torchrun`), through accelerate's PartialState.

A launcher sets WORLD_SIZE and RANK in the environment; diffprobe then asks accelerate for the process
group (gloo on CPUs, NCCL on GPUs), this process's index and device. Items are split by index (i % world ==
rank); each process keeps its own shard's state and the states are added once every process is done.
"""

from __future__ import annotations

import os
from functools import lru_cache


def launched() -> bool:
    """True when a launcher started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def unstarted_processes() -> int | None:
    """The number of processes `accelerate launch --num_processes N` asked for when it started only this one (it
    does so on a machine without GPUs unless told --multi_gpu or --multi_cpu), else None."""
    if launched() or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    for flag, value in zip(parent, parent[1:]):
        if flag == "--num_processes" and value.isdigit() and int(value) > 1:
            return int(value)
        if flag.startswith("--num_processes=") and flag.split("=", 1)[1].isdigit():
            return int(flag.split("=", 1)[1]) if int(flag.split("=", 1)[1]) > 1 else None
    return None


@lru_cache(maxsize=1)
def _state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # gloo between CPU processes, NCCL between GPUs


def shard() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a launcher."""
    if not launched():
        return 0, 1
    state = _state()
    return state.process_index, state.num_processes


def device() -> str | None:
    """The device accelerate gives this process (cuda:<local rank>, or cpu), None without a launcher."""
    return str(_state().device) if launched() else None


def average_gradients(module) -> None:
    """Replace every parameter's gradient by its mean over the processes (one all-reduce of them all, through
    accelerate): data-parallel training whatever the forward passes were (two images per pair here)."""
    import torch
    from accelerate.utils import reduce

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not launched() or not grads:
        return
    flat = reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    start = 0
    for g in grads:
        g.copy_(flat[start:start + g.numel()].view_as(g))
        start += g.numel()


def broadcast_parameters(module) -> None:
    """Every process starts from the first process's parameters."""
    from accelerate.utils import broadcast

    if launched():
        _state()
        for p in module.parameters():
            p.data.copy_(broadcast(p.data.clone(), from_process=0))


def wait_for_everyone() -> None:
    """A barrier across the processes (nothing without a launcher)."""
    if launched():
        _state().wait_for_everyone()
