"""Benchmarks of rst-mart: each compares a pipeline code path with a bare reference, side by side in one
process, and prints both numbers, their ratio and the target. `python -m benchmarks.run_all [--quick]`.
"""
import os

# The stages draw tqdm bars; a benchmark's output is its table lines. Set before anything imports tqdm
# (tqdm reads TQDM_* variables when it is imported).
os.environ.setdefault("TQDM_DISABLE", "1")
