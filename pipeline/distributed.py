"""torchrun awareness: who am I, start the process group, rank 0 writes, the others wait.

Everything degrades to a single process when torchrun's variables are absent, so stages call these
helpers unconditionally.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_process_group(device_type: str) -> DistInfo:
    """Join the process group torchrun set up: NCCL between GPUs, gloo on CPUs. Idempotent."""
    info = dist_info()
    if not info.enabled:
        return info
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist_info().enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank (identity in a single process)."""
    if not dist_info().enabled:
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def destroy_process_group() -> None:
    if dist_info().enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
