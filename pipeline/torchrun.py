"""`python -m pipeline.torchrun [torchrun options] run ...`: torchrun with rst-mart's exit codes.

torchrun reports any failed rank as exit 1 (its ChildFailedError), so a script cannot tell a config
mistake from a crash. This wrapper starts `torch.distributed.run` with the same options; each rank that
stops on a user error leaves its paragraph in a temporary directory, and the wrapper then prints the
lowest rank's paragraph last and exits 2. Otherwise it exits with torchrun's status.

    python -m pipeline.torchrun --standalone --nproc-per-node=4 run --config configs/cifar10_rst_mart.toml
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.cli import ERROR_DIR_ENV, EXIT_USER, _paragraph

COMMANDS = ("run", "status", "sweep")


def main(argv: list[str]) -> int:
    split = next((i for i, arg in enumerate(argv) if arg in COMMANDS), None)
    if split is None:
        print(f"usage: python -m pipeline.torchrun [torchrun options] {{{','.join(COMMANDS)}}} [options]",
              file=sys.stderr)
        return EXIT_USER
    with tempfile.TemporaryDirectory(prefix="rst-mart-errors-") as error_dir:
        command = [sys.executable, "-m", "torch.distributed.run", *argv[:split], "-m", "pipeline", *argv[split:]]
        status = subprocess.run(command, env={**os.environ, ERROR_DIR_ENV: error_dir}).returncode
        errors = sorted(Path(error_dir).glob("rank-*.txt"))
        if errors:
            print(_paragraph(f"error: {errors[0].read_text()}"), file=sys.stderr)
            return EXIT_USER
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
