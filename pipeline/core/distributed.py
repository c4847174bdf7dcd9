"""torchrun awareness: who am I, start the process group, rank 0 writes, the others wait.

Everything degrades to a single process when torchrun's variables are absent, so stages call these
helpers unconditionally. Under torchrun the work dir (and data.root) must be on a filesystem every
rank sees: rank 0 writes the artifacts and checkpoints, and every rank reads them back.
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


def device_type(run_device: str) -> str:
    """"cuda" or "cpu" for run.device (auto|cpu|cuda), as ml.devices.resolve_device will resolve it."""
    if run_device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if run_device.startswith("cuda") else "cpu"


def init_process_group(device_type: str) -> DistInfo:
    """Join the process group torchrun set up: NCCL between GPUs, gloo on CPUs. Idempotent."""
    info = dist_info()
    if not info.enabled:
        return info
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if device_type == "cuda":
            # Bind this process to its GPU before NCCL starts: barriers and broadcast_object_list use
            # the current device, and without this every rank would open a context on cuda:0.
            torch.cuda.set_device(info.local_rank)
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", info.local_rank))
        else:
            dist.init_process_group(backend="gloo")
    return info


def _active() -> bool:
    if not dist_info().enabled:
        return False
    import torch.distributed as dist

    return dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if _active():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value of `obj` (anything picklable) on every rank (identity in a single process)."""
    if not _active():
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(tensor):
    """Sum `tensor` over ranks, in place (on the rank's device: gloo takes CPU tensors, NCCL GPU ones)."""
    if _active():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) of `module`, in place.

    DDP keeps parameters identical, but each rank's train-mode forwards update the running statistics
    with its own slice of the batch. One flat broadcast per dtype (not one per tensor: a ResNet has a
    hundred small buffers, each call a round trip).
    """
    if not _active():
        return
    import torch
    import torch.distributed as dist

    groups: dict = {}
    for buffer in module.buffers():
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    with torch.no_grad():
        for buffers in groups.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, src=0)
            for buffer, part in zip(buffers, flat.split([b.numel() for b in buffers])):
                buffer.copy_(part.view_as(buffer))


def shard_range(total: int, rank: int, world_size: int, block: int = 1) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous shard of `total` rows, cut at multiples of `block`.

    The shards are disjoint, in rank order and cover [0, total); their sizes differ by at most one block.
    Cutting at block boundaries keeps the blocks (batches) exactly those of a single process, so a
    sharded result equals the single-process one: same batch composition, same per-batch seeds.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    blocks = -(-total // block)
    first, last = blocks * rank // world_size, blocks * (rank + 1) // world_size
    return min(first * block, total), min(last * block, total)


def destroy_process_group() -> None:
    if _active():
        import torch.distributed as dist

        dist.destroy_process_group()
