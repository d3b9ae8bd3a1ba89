"""Benchmark suite command line: `python -m revkernels.bench NAME [options]` (see --help)."""
import argparse
import gc
import importlib
import os
import sys
from pathlib import Path

import torch

from .common import Context, default_preset

BENCHMARKS = {
    "kernels": "kernels",
    "memory-depth": "memory_depth",
    "throughput-depth": "throughput_depth",
    "max-batch": "max_batch",
    "drift": "drift",
    "exact": "exact",
    "stability": "stability",
    "quality": "quality",
    "frontier": "frontier",
    "retrofit": "retrofit",
}
WINDOW_COMMANDS = ("gpu-check", "gpu-table4")     # one GPU command each (revkernels.bench.gpu_check)
DESCRIPTION = """\
Benchmarks of revkernels. Each writes OUT/NAME.csv, OUT/NAME.png and OUT/NAME.md (a markdown report
naming the device and preset, with the targets and the paper's figures beside the measured ones) and
prints the markdown.

NAME is one benchmark, `all` (every one in turn; on the gpu preset, the GPU plan's chunks), `plan`
(print the GPU plan's chunks with their estimated GPU minutes and, where a GPU is present, which are
done; it runs nothing), `gpu-check` (the GPU verdict in one command of at most 8 minutes: CUDA tests,
kernel bandwidth, step times, memory, max batch; `make gpu-check`) or `gpu-table4` (the paper's Table 4 in
one command of at most 6 minutes; `make gpu-table4`). With --dry-run these two list their steps and
estimated minutes without a GPU; `--preset tiny` rehearses them on the CPU at tiny shapes.

  kernels           fused ops against PyTorch eager and torch.compile (GPU: GB/s vs copy bandwidth)
  memory-depth      activation memory of a training step against depth, every arch
  throughput-depth  step time against depth: at each arch's max batch (GPU) and at one common batch
  max-batch         the largest batch that trains under each memory budget
  drift             reconstruction and gradient error of the reversible backward against depth
  exact             exact mode's cost: step time of exact=True vs exact=False, midpoint_a's side bits
  stability         linear stability regions of the schemes (closed form)
  quality           five archs trained on real text, then the retrofit of the trained baseline
  frontier          activation memory vs step time: checkpoint, selective AC, reversible stored_layers 0..L
  retrofit          the retrofit of SmolLM2-135M-Instruct: zero-shot KL vs a per form, a="auto", step time
                    vs gradient checkpointing, gradient error, alignment curves, greedy samples

Presets: cpu (small shapes; `make bench` runs them all in about 5 minutes on 2 cores) and gpu (the
paper's shapes on the current CUDA device, as a plan of resumable chunks of under 9 minutes:
`plan` lists them, `all --chunk N` runs one, `all` runs every chunk not yet done). Sweeps append
each finished point to their CSV and a rerun resumes from it; delete a CSV to start it over.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows '(default: X)' after every option whose default is not None (those say it in words)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Input errors as one line on stderr and exit status 2, no usage dump, no traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m revkernels.bench", description=DESCRIPTION, formatter_class=_HelpFormatter)
    ap.add_argument("name", choices=list(BENCHMARKS) + ["all", "plan"] + list(WINDOW_COMMANDS), metavar="NAME",
                    help="the benchmark to run: " + ", ".join(list(BENCHMARKS) + ["all", "plan"] +
                                                              list(WINDOW_COMMANDS)))
    ap.add_argument("--preset", choices=("cpu", "gpu", "tiny"), default=None, metavar="{cpu,gpu}",
                    help="shapes and device (default: gpu when CUDA is available, else cpu; `plan`: gpu)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="output directory (default: plots/ for the gpu preset, else bench-out/)")
    ap.add_argument("--tag-device", action="store_true",
                    help="append the device tag to the file names, NAME-<device>.csv (`cpu` or the CUDA device "
                         "name, e.g. NVIDIA_H100_80GB_HBM3); always on for the gpu preset (default: off)")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="CPU intra-op threads for torch and OMP_NUM_THREADS of probe processes (default: 1 on "
                         "the cpu preset, where small shapes on shared cores thrash with more; else torch's)")
    ap.add_argument("--data", default=None, metavar="FILE",
                    help="quality: train on the bytes of this text file, the last 10%% held out (default: the "
                         "running Python's standard-library sources, split by file)")
    ap.add_argument("--chunk", type=int, default=None, metavar="N",
                    help="with `all --preset gpu`: run only chunk N of the GPU plan (see `plan`), stopping "
                         "at its 8.5-minute limit; rerun to resume (default: every chunk not yet done)")
    ap.add_argument("--dry-run", action="store_true",
                    help="with `all` or `plan`: print the GPU plan's chunks and estimated GPU minutes, run "
                         "nothing (works without a GPU) (default: off)")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.name == "plan":
        args.preset = args.preset or "gpu"
        args.dry_run = True
    if args.name in WINDOW_COMMANDS:
        if args.preset not in (None, "gpu", "tiny"):
            ap.error(f"{args.name} runs the gpu preset (or tiny, a CPU rehearsal), got --preset {args.preset}")
        args.preset = args.preset or "gpu"
    args.preset = args.preset or default_preset()
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.dry_run and args.name not in ("all", "plan", *WINDOW_COMMANDS):
        ap.error("--dry-run goes with `all`, `plan`, `gpu-check` or `gpu-table4`")
    if (args.dry_run or args.chunk is not None) and args.preset != "gpu" and args.name not in WINDOW_COMMANDS:
        ap.error("the chunked plan (--chunk, --dry-run, plan) exists for --preset gpu only")
    if args.chunk is not None:
        from .plan import gpu_plan
        n = len(gpu_plan())
        if args.name != "all":
            ap.error("--chunk goes with `all`")
        if not 1 <= args.chunk <= n:
            ap.error(f"--chunk must be between 1 and {n}, got {args.chunk}")
    if args.name in WINDOW_COMMANDS and args.preset == "tiny" and args.dry_run:
        args.preset = "gpu"
    if args.preset == "gpu" and not args.dry_run and not torch.cuda.is_available():
        ap.error("--preset gpu needs a CUDA device (none is available); use --preset cpu, or `plan` / --dry-run "
                 "to see the GPU plan")
    if args.data is not None:
        _check_data(ap, args)
    if args.out is None:
        args.out = "plots" if args.preset == "gpu" else "bench-out"
    args.tag_device = args.tag_device or args.preset == "gpu"
    return args


def _check_data(ap, args):
    from .quality import PRESETS
    from .corpus import VAL_FRACTION
    path = Path(args.data)
    if not path.is_file():
        ap.error(f"--data {args.data}: no such file")
    need = int((PRESETS[args.preset]["model"]["seq_len"] + 2) / VAL_FRACTION) + 1
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as err:
        ap.error(f"--data {args.data}: cannot read it ({err.strerror})")
    if size < need:
        ap.error(f"--data {args.data}: {size} bytes, too short for the {args.preset} preset (needs >= {need})")


def run_one(name: str, ctx: Context) -> str:
    """Run benchmark `name` in `ctx`, write its files, and return its markdown."""
    module = importlib.import_module(f"revkernels.bench.{BENCHMARKS[name]}")
    try:
        return module.run(ctx)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()   # probes in fresh processes must find the GPU empty


def _run_plan(args) -> int:
    from . import plan
    chunks = plan.gpu_plan()
    ctx = Context("plan", "gpu", args.out, True)
    log = ctx.path("csv")
    done = plan.done_chunks(log, ctx.device_name)
    todo = [c for c in chunks if args.chunk in (None, c.number) and (args.chunk or c.number not in done)]

    def make_context(name, only=None, deadline=None):
        return Context(name, "gpu", args.out, True, args.data, only, deadline)

    finished = True
    for chunk in todo:
        print(f"== chunk {chunk.number}/{len(chunks)}: {chunk.title} (estimated "
              f"{plan.cm.minutes(chunk.estimate_s):.1f} GPU min)", flush=True)
        finished &= plan.run_chunk(chunk, make_context, lambda ctx: run_one(ctx.name, ctx), log,
                                   deadline=args.chunk is not None)
    if not todo:
        print(f"every chunk of the GPU plan is done on this device ({log}); delete it to run the plan again")
    return 0 if finished else 3


def main(argv=None):
    args = parse_args(argv)
    threads = args.threads or (1 if args.preset != "gpu" else None)
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if args.name in WINDOW_COMMANDS:
        from .gpu_check import main as window_main
        return window_main(args)
    if args.dry_run:
        from .gpu_check import budget_table
        from .plan import done_chunks, gpu_plan, plan_table
        done = None
        if args.name == "plan" and torch.cuda.is_available():
            ctx = Context("plan", "gpu", args.out, True)
            done = done_chunks(ctx.path("csv"), ctx.device_name)
        print(plan_table(gpu_plan(), done))
        for command in WINDOW_COMMANDS:
            print(f"\n`{command}`, one GPU command:\n\n{budget_table(command)}")
        return 0
    if args.name == "all" and args.preset == "gpu":
        return _run_plan(args)
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        ctx = Context(name, args.preset, args.out, args.tag_device, args.data)
        print(run_one(name, ctx), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
