"""The retrofit of SmolLM2-135M-Instruct: zero-shot KL vs a per form, a="auto", step time vs gradient
checkpointing, gradient error, alignment curves, greedy samples.

    python benchmarks/retrofit.py [--preset cpu|gpu] [--out DIR]   # = python -m revkernels.bench retrofit
"""
from _entry import run

if __name__ == "__main__":
    run("retrofit")
