"""Fused-kernel bandwidth against eager and torch.compile, and the device's copy bandwidth.

    python benchmarks/kernels.py [--preset cpu|gpu] [--out DIR]   # = python -m revkernels.bench kernels
"""
from _entry import run

if __name__ == "__main__":
    run("kernels")
