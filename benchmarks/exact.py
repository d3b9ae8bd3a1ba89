"""Exact mode's cost: step time of exact=True vs exact=False, and midpoint_a's side bits.

    python benchmarks/exact.py [--preset cpu|gpu] [--out DIR]   # = python -m revkernels.bench exact
"""
from _entry import run

if __name__ == "__main__":
    run("exact")
