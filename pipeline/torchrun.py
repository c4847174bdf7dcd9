"""`python -m pipeline.torchrun [torchrun options] run ...`: torchrun with rst-mart's exit codes.

torchrun reports any failed rank as exit 1 with a ChildFailedError traceback, so a script cannot tell a
config mistake from a crash, and a user reads a traceback for a typo. This wrapper runs torchrun
(`torch.distributed.run`, in this process) with the same options; each rank that stops on a user error
leaves its paragraph in a temporary directory instead of printing it, and the wrapper then prints the
lowest rank's paragraph once and exits 2. A rank that crashed gets torchrun's failure summary (ranks,
exit codes) and exit 1, as with torchrun.

    python -m pipeline.torchrun --standalone --nproc-per-node=4 run --config configs/cifar10_rst_mart.toml
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from pipeline.cli import ERROR_DIR_ENV, EXIT_BUG, EXIT_USER, _paragraph

COMMANDS = ("run", "status", "sweep")


class _NoFailureLine(logging.Filter):
    """Drops the agent's "failed (exitcode: N) local_rank: ..." line: a user error gets its paragraph
    instead, and a crash the failure summary printed below (which says the same)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")


def main(argv: list[str]) -> int:
    split = next((i for i, arg in enumerate(argv) if arg in COMMANDS), None)
    if split is None:
        print(f"usage: python -m pipeline.torchrun [torchrun options] {{{','.join(COMMANDS)}}} [options]",
              file=sys.stderr)
        return EXIT_USER
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args([*argv[:split], "-m", "pipeline", *argv[split:]])
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_NoFailureLine())
    with tempfile.TemporaryDirectory(prefix="rst-mart-errors-") as error_dir:
        os.environ[ERROR_DIR_ENV] = error_dir  # the ranks, started by torchrun, inherit it
        try:
            run(args)
            failure = None
        except ChildFailedError as e:
            failure = e
        except SignalException as e:  # Ctrl-C or a scheduler's SIGTERM: torchrun has stopped the ranks
            print(f"torchrun stopped by {e.sigval.name}; rerun the same command to resume from the last "
                  "checkpoint", file=sys.stderr)
            return 128 + int(e.sigval)
        finally:
            del os.environ[ERROR_DIR_ENV]
        errors = sorted(Path(error_dir).glob("rank-*.txt"))
        if errors:
            print(_paragraph(f"error: {errors[0].read_text()}"), file=sys.stderr)
            return EXIT_USER
    if failure is not None:
        print(str(failure).strip(), file=sys.stderr)
        return EXIT_BUG
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
