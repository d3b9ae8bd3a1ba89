"""Benchmark suite command line.

    python -m revkernels.bench NAME [--preset cpu|gpu] [--out DIR] [--tag-device] [--threads N]

NAME: kernels, memory-depth, throughput-depth, max-batch, drift, stability, or all (every one, in
that order). Each benchmark writes DIR/NAME.csv, DIR/NAME.png and DIR/NAME.md (a markdown table
naming the device and preset, with the paper's figures beside ours where the paper has them) and
prints the markdown. max-batch and throughput-depth append each probe or timing to their CSV as it
finishes and resume from it when rerun; throughput-depth keeps its max-batch probes in
DIR/throughput-depth-probes.csv. Delete a CSV to start that sweep over.

File names. --tag-device appends the device tag to every file name, DIR/NAME-<device>.EXT, where
<device> is `cpu` or the CUDA device name with runs of other characters replaced by `_`
(kernels-NVIDIA_H100_80GB_HBM3.csv). The committed results in plots/ are written that way
(`python -m revkernels.bench all --preset cpu --out plots --tag-device`), and the scripts in
benchmarks/ default to `--out plots --tag-device`; `make bench` writes untagged files to bench-out/.

Presets. gpu (the default when CUDA is available): the paper's shapes, on the current CUDA device.
cpu (the default otherwise): small shapes run on the CPU in well under 15 minutes on 2 cores; the
fused ops take the PyTorch reference path (no Triton interpreter), and every table and plot says
CPU. tiny (not listed in --help): seconds-long shapes for the test suite.

--threads N sets torch's intra-op CPU threads (and OMP_NUM_THREADS for probe processes); on a
loaded machine one thread times small CPU shapes far more steadily than two.
"""
import argparse
import gc
import importlib
import os
import sys

import torch

from .common import PRESETS, Context, default_preset

BENCHMARKS = {
    "kernels": "kernels",
    "memory-depth": "memory_depth",
    "throughput-depth": "throughput_depth",
    "max-batch": "max_batch",
    "drift": "drift",
    "stability": "stability",
}


def run_one(name: str, preset: str, out, tag_device: bool) -> str:
    """Run benchmark `name`, write its files, and return its markdown."""
    module = importlib.import_module(f"revkernels.bench.{BENCHMARKS[name]}")
    try:
        return module.run(Context(name, preset, out, tag_device))
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()   # probes in fresh processes must find the GPU empty


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m revkernels.bench",
                                 description="Benchmarks of revkernels (see the module docstring).")
    ap.add_argument("name", choices=list(BENCHMARKS) + ["all"])
    ap.add_argument("--preset", choices=PRESETS, metavar="{cpu,gpu}", default=None,
                    help="shapes and device (default: gpu when CUDA is available, else cpu)")
    ap.add_argument("--out", default="bench-out", help="output directory (default: bench-out)")
    ap.add_argument("--tag-device", action="store_true",
                    help="append the device tag to the file names: NAME-<device>.csv")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    preset = args.preset or default_preset()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        print(run_one(name, preset, args.out, args.tag_device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
