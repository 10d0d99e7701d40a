"""Command-line entry point: `python scripts/benchmark.py decode ...` (also installed as `longvq-benchmark`)."""

import sys

from longvq.cli import benchmark

if __name__ == "__main__":
    sys.exit(benchmark())
