"""Running under ``torchrun`` on the torch side: this rank's device, the process group's set-up and
teardown, barrier and broadcast. Every helper is a no-op in a single process.

The feature pass (teachers) and training (distill) both join the group torchrun describes in the
environment (``WORLD_SIZE``, ``LOCAL_RANK``); whoever creates the group tears it down. The collectives
of training itself (gathers, DDP) are ``edge_msd.distill.dist``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from edge_msd.errors import ConfigError


def launched() -> bool:
    """True when torchrun started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), valid before the process group is
    joined and after it is gone: what decides who writes a run's shared files."""
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside ``torch.distributed``."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(device: str) -> str:
    """The device of this process; ``auto`` is CUDA when present, else the CPU.

    Under torchrun a CUDA device means this rank's ``cuda:LOCAL_RANK``, made current, so that no rank
    (and no NCCL collective) lands on another rank's GPU.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda") or not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("cuda", f"cuda:{local}"):
        raise ConfigError(f"field 'device': {device} under torchrun, where rank {local} uses cuda:{local}; "
                          "pass --device cuda or auto")
    torch.cuda.set_device(local)
    return f"cuda:{local}"


@contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """Join the torchrun process group for work on ``device`` (NCCL on CUDA, else gloo) if launched by
    torchrun and none is up; yields True if this call created it, and then destroys it on leaving.

    The rank's GPU is made current first, so NCCL's collectives never all land on ``cuda:0``.
    """
    created = launched() and not dist.is_initialized()
    if created:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield created
    finally:
        if created:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable Python value), so that all ranks decide alike."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
