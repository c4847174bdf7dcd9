"""A runner process for the race tests: one spy stage that says when it started and then waits for a
line on stdin, so the test can hold it mid-stage while another process tries the same work dir or entry.

    python -m tests.pipeline.race_worker WORKDIR STORE
Exit 0 done, 2 user error (as the CLI).
"""
import sys
from pathlib import Path

from pipeline.config import Config
from pipeline.core.errors import UserError
from pipeline.runner import Runner
from pipeline.stage import Stage


def build(ctx):
    print("started", flush=True)
    sys.stdin.readline()  # held here until the test lets go
    (ctx.out_dir / "out.txt").write_text("built")


def main(workdir: str, store: str) -> int:
    config = Config()
    config.run.store = store
    stages = {"teacher": Stage("teacher", 1, "teacher", ("out.txt",), build)}
    try:
        Runner(config, Path(workdir), log=lambda line: print(line, flush=True), stages=stages).run(["teacher"])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
