"""`python -m benchmarks.gpu_check`: exit 1 when a check failed."""
import sys

from benchmarks.gpu_check.checks import main

table = main()
sys.exit(1 if (table["status"] == "FAIL").any() else 0)
