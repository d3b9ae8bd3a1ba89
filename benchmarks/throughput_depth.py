"""Throughput against depth at max batch and at a common batch (paper Table 4).

    python benchmarks/throughput_depth.py [--preset cpu|gpu] [--out DIR]   # = python -m revkernels.bench throughput-depth
"""
from _entry import run

if __name__ == "__main__":
    run("throughput-depth")
