"""Training-step time of two git revisions of revkernels, side by side in one run.

Each revision is checked out (git worktree, detached) and served by its own worker process; the
workers are driven in turn, never at once: `rounds` rounds, each timing `steps` steps of every
(revision, arch), the two revisions of an arch back to back (which one first alternates by round) and
the archs' order reversed every other round, so a load change on a shared machine hits every cell
alike. Reported: the median ms per step of each cell and, per revision, each arch's ratio to
`baseline` and to `checkpoint`.

    python scripts/compare_revisions.py BEFORE AFTER [--archs ...] [--out FILE.md]

Runs the PyTorch formulas on CPU (TRITON_INTERPRET unset); torch's intra-op threads = --threads.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

WORKER = r"""
import json, sys, time, torch
import revkernels
from revkernels.models import GPT, GPTConfig
print(json.dumps(revkernels.__file__), flush=True)
shape, threads = json.loads(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
idx = torch.randint(0, shape["vocab_size"], (shape.pop("batch"), shape["seq_len"]))
steps = {}
def make(arch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch=arch, **shape))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    def step():
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step
for line in sys.stdin:
    arch, n = line.split()
    if arch not in steps:
        steps[arch] = make(arch)
        steps[arch]()
    t0 = time.perf_counter()
    for _ in range(int(n)):
        steps[arch]()
    print(json.dumps((time.perf_counter() - t0) * 1e3 / int(n)), flush=True)
"""


def worker(rev, shape, threads):
    tree = tempfile.mkdtemp(prefix="rev-")
    subprocess.run(["git", "worktree", "add", "--detach", tree, rev], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = tree
    proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(shape), str(threads)], cwd=tree, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    print(f"{rev}: {json.loads(proc.stdout.readline())}")     # the copy this worker imported
    return tree, proc


def time_cell(proc, arch, steps):
    proc.stdin.write(f"{arch} {steps}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--archs", nargs="+", default=["baseline", "checkpoint", "midpoint", "leapfrog", "hamiltonian"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    if not {"baseline", "checkpoint"} <= set(args.archs):
        ap.error("--archs must include baseline and checkpoint (the ratios' denominators)")
    shape = dict(vocab_size=256, seq_len=128, d_model=256, n_heads=4, n_layers=8, batch=8)
    revs = {"before": args.before, "after": args.after}
    workers = {name: worker(rev, shape, args.threads) for name, rev in revs.items()}
    times = {(name, arch): [] for name in revs for arch in args.archs}
    try:
        for r in range(args.rounds):
            names = list(revs) if r % 2 == 0 else list(revs)[::-1]
            for arch in (args.archs if r % 4 < 2 else args.archs[::-1]):
                for name in names:
                    times[(name, arch)].append(time_cell(workers[name][1], arch, args.steps))
    finally:
        for tree, proc in workers.values():
            proc.stdin.close()
            proc.wait()
            subprocess.run(["git", "worktree", "remove", "--force", tree], check=True)
    med = {cell: statistics.median(ts) for cell, ts in times.items()}
    lines = [f"Step time, CPU, {args.threads} threads, shape {shape}, {args.rounds} interleaved rounds of "
             f"{args.steps} steps, medians.", "",
             f"| arch | {revs['before']} ms | {revs['after']} ms | before / baseline | after / baseline | "
             "before / checkpoint | after / checkpoint |", "|---|---|---|---|---|---|---|"]
    for arch in args.archs:
        b, a = med[("before", arch)], med[("after", arch)]
        lines.append(f"| {arch} | {b:.1f} | {a:.1f} | {b / med[('before', 'baseline')]:.3f} | "
                     f"{a / med[('after', 'baseline')]:.3f} | {b / med[('before', 'checkpoint')]:.3f} | "
                     f"{a / med[('after', 'checkpoint')]:.3f} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
