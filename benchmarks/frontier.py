"""Activation memory against step time: checkpointing, selective AC and the reversible stored-layers hybrid.

    python benchmarks/frontier.py [--preset cpu|gpu] [--out DIR]   # = python -m revkernels.bench frontier
"""
from _entry import run

if __name__ == "__main__":
    run("frontier")
