"""A runner process for the race and store tests: spy stages, so a test can hold a real run where it wants.

    python -m tests.pipeline.race_worker WORKDIR STORE [--stages teacher,mart] [--seed N]
                                         [--hold build|open|none] [--status]

`teacher` writes out.txt; `mart` reads teacher and a data source `pool`. `--hold build` (the default):
teacher prints "started" and waits for a line on stdin; `--hold open`: opening the pool (after the run
has planned and before it links anything) prints "opening" and stops the process with SIGSTOP until
the test sends SIGCONT. `--status`: print each stage's plan (verified) instead of running.
Exit 0 done, 2 user error (as the CLI).
"""
import argparse
import os
import signal
import sys
from pathlib import Path

from pipeline.config import Config
from pipeline.core.errors import UserError
from pipeline.runner import Runner
from pipeline.stage import Source, Stage


def main(argv) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("store")
    parser.add_argument("--stages", default="teacher")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hold", choices=["build", "open", "none"], default="build")
    parser.add_argument("--status", action="store_true")
    args = parser.parse_args(argv)

    def build_teacher(ctx):
        if args.hold == "build":
            print("started", flush=True)
            sys.stdin.readline()  # held here until the test lets go
        (ctx.out_dir / "out.txt").write_text("built")

    def build_mart(ctx):
        (ctx.out_dir / "out.txt").write_text((ctx.inputs["teacher"].path / "out.txt").read_text() + " then mart")

    def open_pool(config, cache_dir):
        if args.hold == "open":
            print("opening", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)  # held here, planned but nothing linked, until SIGCONT

    pool = Source("pool", lambda config: "pool-v1", open_pool)
    stages = {"teacher": Stage("teacher", 1, "teacher", ("out.txt",), build_teacher, reads=("run.seed",)),
              "mart": Stage("mart", 1, "mart", ("out.txt",), build_mart, inputs=lambda c: ("teacher", pool))}
    config = Config()
    config.run.store = args.store
    config.run.seed = args.seed
    runner = Runner(config, Path(args.workdir), log=lambda line: print(line, flush=True), stages=stages)
    try:
        if args.status:
            for plan in runner.plan(args.stages.split(","), verify=True):
                print(f"{plan.stage.name}: {plan.reason}", flush=True)
        else:
            runner.run(args.stages.split(","))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
