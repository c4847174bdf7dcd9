"""Runs the generate stage in its own process (for kill tests): generate_worker GENERATOR OUT_DIR N."""
import sys
from pathlib import Path

from tests.stages.generator_fixture import generate_config, run_generate

if __name__ == "__main__":
    generator, out_dir, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    run_generate(generator, out_dir, generate_config(n=n, shard_size=8, batch_size=4))
