"""Keep freed host memory in the process, so large CPU tensors reuse it instead of faulting in fresh pages.

glibc serves every allocation above its mmap threshold (32 MiB at most, however it is tuned) with a
fresh `mmap` and unmaps it on free. A CPU forward at a realistic batch size allocates activations above
that size, so every step asks the kernel for new pages, and the kernel faults and zeroes each one: on
this project's 2-core Xeon a batch-1024 `tiny-cnn` forward spent 40% of its CPU time in the kernel
(`clear_page_erms` under page faults, 5 faults per image), and PGD-20 at batch 256 on the demo model
paid 500,000 faults per batch. With `M_MMAP_MAX = 0` glibc serves those allocations from its heap,
where a freed block is reused by the next step, and a high `M_TRIM_THRESHOLD` keeps it from handing the
heap's top back between steps: the same forward ran 1.6-1.8x faster, the pseudolabel stage 2.1x and
PGD-20 1.2x (README, "Host memory on a Linux CPU"). The cost is that memory freed at a stage's end stays
in the process until `release_free_memory` (malloc_trim) returns it, which the runner calls after every
stage.

glibc's other arenas (threads other than the main one) still fall back to mmap for blocks over their
64 MiB heaps, so nothing fails that worked before. On another C library (musl, macOS) both calls do
nothing. `RST_MART_KEEP_FREED_MEMORY=0` leaves glibc as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys

ENV = "RST_MART_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
_TRIM_THRESHOLD = 1 << 30  # larger than any step's working set that would be handed back and faulted in again


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Tell glibc to keep large freed blocks for reuse (idempotent); False where it could not or was told not to."""
    libc = _glibc()
    if libc is None or os.environ.get(ENV, "1") == "0":
        return False
    # mallopt returns 1 on success.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def release_free_memory() -> None:
    """Hand the heap's free pages back to the kernel (between stages, not between steps)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
