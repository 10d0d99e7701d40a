"""Command-line entry point: `python scripts/benchmark.py decode ...` (also installed as `longvq-benchmark`)."""

from longvq.benchmark import main

if __name__ == "__main__":
    main()
