"""Freed host memory reused, not faulted in again: the allocator setting the runner makes before every stage."""
import os
import statistics
import subprocess
import sys
import textwrap

import pytest

from pipeline.core import host_memory

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="the setting is glibc's; this C library has none")

# A step's worth of large buffers allocated and freed ten times; prints each step's page faults. glibc's
# heap settles on a layout over the first steps, and where ASLR places the heap it sometimes takes a few
# more (with two OpenMP threads, steps 4-5 faulted like fresh ones in 11 of 30 runs; every later step 0), so
# the tests judge the median of the last seven steps, not their sum.
_STEPS = textwrap.dedent("""
    import resource, sys
    import torch
    from pipeline.core import host_memory
    print(host_memory.keep_freed_memory() if sys.argv[1] == "keep" else "untouched")
    def step():
        # Activations over glibc's 32 MiB mmap ceiling, in 4 KiB pages (PyTorch's default on a CPU).
        buffers = [torch.ones(48 << 20, dtype=torch.uint8) for _ in range(3)]
        return sum(int(b[::4096].sum()) for b in buffers)
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str, env=None) -> tuple[str, int]:
    """The setting's answer and the median page faults of a step once the heap has settled."""
    env = {**(env or os.environ), "THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return out[0], int(statistics.median(int(n) for n in out[-7:]))


def test_large_buffers_are_reused_after_keep_freed_memory():
    # 3 x 48 MiB in 4 KiB pages is ~36,000 faults a step when each buffer is a fresh mapping.
    untouched, faults_before = _faults("untouched")
    kept, faults_after = _faults("keep")
    assert (untouched, kept) == ("untouched", "True")
    assert faults_before > 30_000, faults_before
    assert faults_after < 1_000, faults_after


def test_environment_switch_leaves_glibc_alone():
    env = {**os.environ, host_memory.ENV: "0"}
    kept, faults = _faults("keep", env)
    assert kept == "False" and faults > 30_000


def test_release_free_memory_is_safe_to_call_any_time():
    host_memory.release_free_memory()
    host_memory.release_free_memory()
