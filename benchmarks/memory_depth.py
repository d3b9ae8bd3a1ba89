"""Training memory against depth for every GPT arch (paper Fig. 3).

    python benchmarks/memory_depth.py [--preset cpu|gpu] [--out DIR]   # = python -m revkernels.bench memory-depth
"""
from _entry import run

if __name__ == "__main__":
    run("memory-depth")
