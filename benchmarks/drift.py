"""Reconstruction and gradient drift against depth, per scheme.

    python benchmarks/drift.py [--preset cpu|gpu] [--out DIR]   # = python -m revkernels.bench drift
"""
from _entry import run

if __name__ == "__main__":
    run("drift")
