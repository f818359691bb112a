"""Data parallelism under torchrun, in one place: the rank and world size of the process group, and the group's
start-up and tear-down for a command (collect and train run the same way on one process and on several)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def torchrun_group(device: str) -> Iterator[str]:
    """Under torchrun (WORLD_SIZE > 1) with no group yet: start one (nccl for CUDA, gloo otherwise) with this
    process on cuda:LOCAL_RANK when the device is CUDA, and destroy it on the way out. Yields the device this
    process uses; one process (or a group someone else started) runs as is."""
    own = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if own:
        if device.startswith("cuda"):
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield device
    finally:
        if own:
            dist.destroy_process_group()
