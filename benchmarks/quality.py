"""Training quality of every arch on real text, and the retrofit of the trained baseline.

    python benchmarks/quality.py [--preset cpu|gpu] [--data FILE]   # = python -m revkernels.bench quality
"""
from _entry import run

if __name__ == "__main__":
    run("quality")
