"""Largest training batch per emulated GPU memory budget (paper Table 3).

    python benchmarks/max_batch.py [--preset cpu|gpu] [--out DIR]   # = python -m revkernels.bench max-batch
"""
from _entry import run

if __name__ == "__main__":
    run("max-batch")
