"""The MixedBatchLoader on each device: unpinned and stream-less on the CPU; pinned host batches and a copy
stream on CUDA, giving the CPU loader's batches while the compute stream is busy."""
from __future__ import annotations

import numpy as np
import torch

from benchmarks.gpu_check.common import Context, Skipped


def check_loader_cpu(ctx: Context) -> str:
    from benchmarks.bench_mart import synthetic_training_data
    from data.mixed import MixedBatchLoader, MixedBatchSampler

    data = synthetic_training_data((32, 32, 3), 128, 128)
    epochs = {}
    for prefetch in (0, 2):
        sampler = MixedBatchSampler(128, 128, batch_size=32, unsup_fraction=0.5, epoch_size=256, seed=0)
        loader = MixedBatchLoader(sampler, data["images"], data["labels"], data["pool_images"], data["pool_labels"],
                                  device="cpu", prefetch=prefetch)
        if loader._copy_stream is not None:
            raise AssertionError("a CPU loader made a CUDA copy stream")
        epochs[prefetch] = list(loader)
        if any(x.is_pinned() for x, _ in epochs[prefetch]):
            raise AssertionError("a CPU loader pinned its batches")
    same = all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(epochs[0], epochs[2]))
    if not same or len(epochs[0]) != len(epochs[2]) != 8:
        raise AssertionError("prefetch 0 and 2 gave different batches")
    return f"{len(epochs[0])} batches, unpinned, no copy stream, prefetch 0 == prefetch 2"


def check_loader_cuda(ctx: Context) -> str:
    from benchmarks.bench_mart import synthetic_training_data
    from data.mixed import MixedBatchLoader, MixedBatchSampler

    if ctx.rehearsal:
        raise Skipped("pinned memory and copy streams need CUDA")
    data = synthetic_training_data((32, 32, 3), 512, 512)

    def epoch(device, prefetch, busy):
        sampler = MixedBatchSampler(512, 512, batch_size=128, unsup_fraction=0.5, epoch_size=2048, seed=0)
        loader = MixedBatchLoader(sampler, data["images"], data["labels"], data["pool_images"], data["pool_labels"],
                                  device=device, prefetch=prefetch, channels_last=True)
        out = []
        for x, y in loader:
            if busy:  # keep the compute stream busy, so a missing wait on the copy would read stale memory
                a = torch.randn(2048, 2048, device=device)
                for _ in range(20):
                    a = a @ a / 2048 ** 0.5
            out.append((x.sum(dim=(1, 2, 3)).cpu(), y.cpu()))  # a kernel on the compute stream reads the batch
        return loader, out

    _, expected = epoch("cpu", 0, False)
    loader, _ = epoch(ctx.device, 2, False)
    if loader._copy_stream is None:
        raise AssertionError("a CUDA loader has no copy stream")
    x, y = loader._build(0, 0, np.arange(4), np.arange(4))
    if not (x.is_pinned() and y.is_pinned()):
        raise AssertionError("the CUDA loader's host batches are not pinned")
    for prefetch in (0, 2):
        _, got = epoch(ctx.device, prefetch, True)
        bad = [i for i, ((a, b), (c, d)) in enumerate(zip(expected, got))
               if not (torch.allclose(a, c, rtol=1e-5) and torch.equal(b, d))]
        if bad or len(got) != len(expected):
            raise AssertionError(f"prefetch {prefetch}: batches {bad} differ from the CPU loader's")
    return f"pinned host batches, copy stream; {len(expected)} batches equal the CPU loader's (prefetch 0 and 2)"
