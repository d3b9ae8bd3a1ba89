"""gpu-check: the GPU verdict in one command of at most 8 minutes on a bare H100 (`make gpu-check`), and the
paper's Table 4 in a second command of at most 6 (`make gpu-table4`).

    python -m revkernels.bench gpu-check [--dry-run] [--out DIR]    # DIR default plots/
    python -m revkernels.bench gpu-table4 [--dry-run] [--out DIR]

gpu-check runs, in this order, each step saving as it goes (device-tagged files NAME-<device>.* in DIR):
1. tests: the CUDA tests of the ops, the scheduler, exact mode and test_cuda_attention.py (pytest, no -x,
   the CPU duplicates deselected, pytest-xdist workers when installed; junit XML, log and summary kept);
2. kernels: the fused ops' bandwidth against a device copy at two sizes (revkernels.bench.kernels);
3. step time of baseline, checkpoint, selective AC, reversible and the stored-layers hybrid (with and
   without store_policy) at GPT-2 small shape and at d=512, L=48 (revkernels.bench.frontier, interleaved);
4. memory of baseline, checkpoint and reversible at L=16 and 48 (revkernels.bench.memory_depth);
5. max batch at T=1024 under one budget, with the hybrid row (revkernels.bench.max_batch).
gpu-table4: throughput at max batch, d=512, 8 heads, L=16/32/64/96 (revkernels.bench.throughput_depth).

Time: each step is a chunk of revkernels.bench.plan with a cap: its cost-model estimate times CAP_FACTOR
(at least CAP_EXTRA_S more than the estimate), cut so that every later step keeps RESERVE of its estimate
before the command's limit (WALL_LIMIT_S from GPU_CHECK_T0, the epoch second the Makefile records before
installing; else from this process's start). A step past its cap stops with its finished points saved; a
failing step is logged and the next one runs. Only the kernels step autotunes the tiles; the steps after it
run untuned (see _untuned). The progress log is NAME-steps-<device>.csv (plan's columns), the summary
NAME-summary-<device>.md. When $OUT is set (the device tool brings back only $OUT, at most 8 files), every
file of the command is packed after each step into $OUT/NAME-<device>.tar.gz, beside a copy of the summary.
"""
import importlib.util
import os
import signal
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from time import monotonic, time

from . import cost_model as cm
from . import frontier, kernels, max_batch, memory_depth, plan, throughput_depth
from .common import GIB, Context, markdown_table, read_csv

WALL_LIMIT_S = {"gpu-check": 8 * 60, "gpu-table4": 6 * 60}
INSTALL_S = 30.0         # `pip install --no-deps --no-build-isolation -e .` on the device (before Python starts)
FINISH_S = 10.0          # the summary and the $OUT archive after the last step
CAP_FACTOR, CAP_EXTRA_S = 2.0, 30.0   # a step may run max(CAP_FACTOR x, CAP_EXTRA_S +) its estimate ...
RESERVE = 0.5            # ... as long as every later step keeps this fraction of its estimate
INTERRUPT_GRACE_S = 20   # pytest past its cap gets SIGINT (it still writes its junit XML), then SIGKILL
TEST_FILES = ("tests/test_ops.py", "tests/test_scheduler.py", "tests/test_exact.py", "tests/test_cuda_attention.py")
# pytest on the GPU: the cuda-parametrised tests (~450, each a few ms once compiled) and the Triton JIT of every
# kernel specialisation they reach (~100, untuned: REVKERNELS_AUTOTUNE=0), spread over the workers
TEST_CASES, TEST_CASE_S, TEST_SPECIALISATIONS = 450, 0.05, 100
TEST_WORKERS = 8
TEST_TIMEOUT_S = 90      # pytest-timeout per test, when installed: a hung test cannot eat the step
GPT_L48 = dict(cm.GPT2_SMALL, d_model=512, n_heads=8, n_layers=48)


@dataclass
class Step:
    """One step: a plan Chunk (number, name, title, estimate) and the settings its runner gets."""
    chunk: plan.Chunk
    runner: str               # function name in this module: (ctx, settings) -> markdown
    settings: dict


def _steptime(shape, batch, preset):
    L = shape["n_layers"]
    return dict(frontier.PRESETS[preset], shape=shape, batch=batch, stored=(0, L // 2, L), warmup=2, rounds=5,
                per_round=2)


def settings(preset: str) -> dict:
    """Every step's settings: the gpu preset's, or `tiny` shapes that rehearse the same code on a CPU."""
    if preset == "tiny":
        tiny_fr = dict(frontier.PRESETS["tiny"], fixed=("baseline", "selective-ac"), stored=(0, 1), policies=(None,),
                       rounds=1)
        return dict(
            tests=dict(files=("tests/test_bench.py",), select="markdown_table", workers=0),
            kernels=kernels.PRESETS["tiny"],
            steptime=(("L3", tiny_fr),),
            memory=dict(memory_depth.PRESETS["tiny"], depths=(1,), archs=("baseline", "midpoint")),
            max_batch=dict(max_batch.PRESETS["tiny"], hybrid=dict(arch="midpoint", stored=(1,))),
            table4=dict(throughput_depth.PRESETS["tiny"], archs=(), depths=(1,)))
    return dict(
        tests=dict(files=TEST_FILES, select="not cpu", workers=TEST_WORKERS),
        # GPT-2 small's width; two sizes beyond the 50 MB L2
        kernels=dict(kernels.PRESETS["gpu"], sizes=(2 ** 24, 2 ** 26), copy_ref=2 ** 26, d=768, compile=False),
        steptime=(("L12", _steptime(cm.GPT2_SMALL, 8, "gpu")), ("L48", _steptime(GPT_L48, 8, "gpu"))),
        memory=dict(memory_depth.PRESETS["gpu"], depths=(16, 48), archs=("baseline", "checkpoint", "midpoint")),
        max_batch=dict(max_batch.PRESETS["gpu"], budgets=(("24 GB", 24 * GIB),)),
        # Table 4: only the max-batch rows (no common-batch timing); each timed run is one step after the
        # measured (first) step, seconds long at these batches
        table4=dict(throughput_depth.PRESETS["gpu"], archs=(), warmup=0, steps=1))


# ------------------------------------------------------------------ estimates (cost model)

def _tests_s(s):
    """pytest and its workers start (in parallel), then the cases and compilations spread over the workers."""
    workers = max(1, s["workers"])
    starts = 2 if s["workers"] else 1
    return starts * cm.PROCESS_START_S + (TEST_CASES * TEST_CASE_S + TEST_SPECIALISATIONS * cm.TRITON_JIT_S) / workers


def _kernels_s(p):
    """Every op autotuned once at width d (each candidate tile compiled), then do_bench per size and provider."""
    from .. import tiles
    compiles = sum(len(tiles.candidates(p["d"], 4, op.name.endswith("coef_grads"))) for op in kernels.OPS)
    timings = len(p["sizes"]) * (len(kernels.OPS) * 2 + 1) * 0.25 + 0.25
    return compiles * cm.TRITON_JIT_S + timings


def _steptime_s(p):
    """frontier's estimate (untuned tiles: one compilation per kernel)."""
    return plan._frontier_s(p)


def _memory_s(p):
    return sum(cm.probe_s(dict(p["shape"], n_layers=L, arch=a, loss_chunk_tokens=p["loss_chunk_tokens"]),
                          p["batch"], steps=2) for a in p["archs"] for L in p["depths"])


def _table4_s(p):
    total = 0.0
    for L in p["depths"]:
        for a in p["max_archs"]:          # probes at 1/8 and 1/4 of the model's batch, then the timed run
            cfg = dict(p["shape"], n_layers=L, arch=a, loss_chunk_tokens=p["loss_chunk_tokens"])
            b = min(cm.max_batch(cfg, cm.H100_MEMORY_BYTES), p["cap"])
            total += cm.probe_s(cfg, b // 8, 2) + cm.probe_s(cfg, b // 4, 2) + \
                cm.probe_s(cfg, b, steps=p["warmup"] + 1 + p["steps"])
    return total


def steps(command: str, preset: str = "gpu") -> list:
    """The steps of `command` ('gpu-check' or 'gpu-table4') in the order they run."""
    s = settings(preset)
    if command == "gpu-table4":
        t4 = s["table4"]
        return [Step(plan.Chunk(1, "gpu-table4", "Table 4: baseline and midpoint at max batch, d=512, 8 heads, "
                                f"L={'/'.join(map(str, t4['depths']))}", _table4_s(settings("gpu")["table4"])),
                     "run_table4", t4)]
    out = [(f"{command}-tests", "CUDA tests: ops, scheduler, exact mode, test_cuda_attention.py",
            _tests_s(settings("gpu")["tests"]), "run_tests", s["tests"]),
           (f"{command}-kernels", "kernel bandwidth vs a device copy at 16M and 64M elements, d=768",
            _kernels_s(settings("gpu")["kernels"]), "run_kernels", s["kernels"])]
    for (name, p), (_, gp) in zip(s["steptime"], settings("gpu")["steptime"]):
        sh = gp["shape"]
        out.append((f"{command}-steptime-{name}", f"step time, d={sh['d_model']} L={sh['n_layers']} batch "
                    f"{gp['batch']}: baseline, checkpoint, selective AC, midpoint k=0/{sh['n_layers'] // 2}/"
                    f"{sh['n_layers']} (+matmuls)", _steptime_s(gp), "run_steptime", p))
    gm = settings("gpu")["memory"]
    out.append((f"{command}-memory", f"memory at L={'/'.join(map(str, gm['depths']))}: {', '.join(gm['archs'])}",
                _memory_s(gm), "run_memory", s["memory"]))
    gb = settings("gpu")["max_batch"]
    out.append((f"{command}-max-batch", f"max batch, GPT-2 small T=1024, {gb['budgets'][0][0]}: "
                f"{', '.join(gb['archs'])}, hybrid k={'/'.join(map(str, gb['hybrid']['stored']))}",
                plan._max_batch_s(gb["budgets"], gb), "run_max_batch", s["max_batch"]))
    return [Step(plan.Chunk(i, name, title, est), runner, st) for i, (name, title, est, runner, st)
            in enumerate(out, 1)]


def estimate_s(command: str) -> float:
    """The command's estimated wall time on an H100: install, every step, the final archive."""
    return INSTALL_S + sum(st.chunk.estimate_s for st in steps(command)) + FINISH_S


def budget_table(command: str) -> str:
    rows = [[st.chunk.number, st.chunk.benchmark, st.chunk.title, f"{cm.minutes(st.chunk.estimate_s):.1f}"]
            for st in steps(command)]
    total = estimate_s(command)
    return (markdown_table(["step", "name", "what", "estimated GPU min"], rows) +
            f"\n\n`make {command}`: {cm.minutes(total):.1f} estimated minutes with the install ({INSTALL_S:.0f} s) "
            f"and the final archive; its limit is {WALL_LIMIT_S[command] / 60:.0f} minutes (one GPU command; "
            f"each step capped, see revkernels/bench/gpu_check.py).")


# ------------------------------------------------------------------ step runners

def run_tests(ctx, s) -> str:
    """pytest of the CUDA tests in a subprocess, killed at the step's deadline; junit XML and log kept."""
    xml, log = ctx.path("xml"), ctx.path("log")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *s["files"], "-k", s["select"],
           f"--junitxml={xml}"]
    if s["workers"] and importlib.util.find_spec("xdist"):
        cmd += ["-n", str(s["workers"])]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += [f"--timeout={TEST_TIMEOUT_S}"]
    env = dict(os.environ, REVKERNELS_AUTOTUNE="0")
    timed_out = False
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=max(1.0, ctx.remaining_s() - INTERRUPT_GRACE_S))
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)          # pytest stops, reports and writes its junit XML
            try:
                rc = proc.wait(timeout=INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    tail = log.read_text().splitlines()[-15:]
    counts = _junit_counts(xml)
    verdict = (f"interrupted at the step's time cap (exit code {rc}); the counts are of the tests that ran"
               if timed_out else f"exit code {rc}" + (": all selected tests passed" if rc == 0 else ""))
    table = markdown_table(list(counts), [list(counts.values())]) if counts else "(no junit XML)"
    md = (f"# gpu-check: CUDA tests\n\nDevice: **{ctx.device_name}**\n\n`{' '.join(cmd[2:])}`\n\n{verdict}\n\n{table}"
          f"\n\nLast lines of the log ({log.name}):\n\n```\n" + "\n".join(tail) + "\n```\n")
    ctx.path("md").write_text(md)
    if timed_out:
        from .common import ChunkTimeUp
        raise ChunkTimeUp("pytest ran past the step's cap")
    return md


def _junit_counts(path) -> dict:
    if not Path(path).exists():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "time")}


def run_kernels(ctx, p) -> str:
    return kernels.run(ctx, p)           # tiles autotuned (the default on a GPU): bandwidth is the point


def _untuned():
    """Every later launch, in this process and in the probes it starts, takes the first candidate tile
    untimed (REVKERNELS_AUTOTUNE=0): one compilation per kernel instead of one per candidate. The tile
    moves only the elementwise kernels, small next to a training step's matmuls."""
    from .. import tiles
    os.environ["REVKERNELS_AUTOTUNE"] = "0"
    tiles.AUTOTUNE = False


def run_steptime(ctx, p) -> str:
    _untuned()
    return frontier.run(ctx, p)


def run_memory(ctx, p) -> str:
    _untuned()
    return memory_depth.run(ctx, p)


def run_max_batch(ctx, p) -> str:
    _untuned()
    return max_batch.run(ctx, p)


def run_table4(ctx, p) -> str:
    _untuned()
    return throughput_depth.run(ctx, p)


# ------------------------------------------------------------------ the command

def caps(step_list, now_s: float, end_s: float) -> list:
    """Deadline (seconds on the same clock as `now_s`) of each step if it started now: its estimate times
    CAP_FACTOR (at least CAP_EXTRA_S above it), but leaving RESERVE of every later step's estimate before
    `end_s`."""
    out = []
    for i, st in enumerate(step_list):
        later = RESERVE * sum(s.chunk.estimate_s for s in step_list[i + 1:])
        est = st.chunk.estimate_s
        out.append(min(now_s + max(CAP_FACTOR * est, est + CAP_EXTRA_S), end_s - later))
    return out


def _export(out_dir: Path, command: str, tag: str, summary: Path):
    """Pack every file of this command into $OUT (when set) with a copy of the summary."""
    dest = os.environ.get("OUT")
    if not dest:
        return
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(f for f in out_dir.glob(f"{command}*-{tag}*") if f.is_file())
    tmp = dest / f".{command}-{tag}.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    os.replace(tmp, dest / f"{command}-{tag}.tar.gz")
    (dest / summary.name).write_text(summary.read_text())


def main(args) -> int:
    """`python -m revkernels.bench gpu-check|gpu-table4` (args from revkernels.bench.__main__)."""
    command = args.name
    if args.dry_run:
        print(budget_table(command))
        return 0
    t0 = float(os.environ.get("GPU_CHECK_T0") or time())
    end = monotonic() + WALL_LIMIT_S[command] - (time() - t0) - FINISH_S
    step_list = steps(command, args.preset)
    out = Path(args.out)
    log = Context(f"{command}-steps", args.preset, out, True).path("csv")
    results = []

    def make_context(name, only=None, deadline=None):
        return Context(name, args.preset, out, True, None, only, deadline)

    for i, st in enumerate(step_list):
        limit = caps(step_list[i:], monotonic(), end)[0] - monotonic()
        print(f"== {command} step {st.chunk.number}/{len(step_list)}: {st.chunk.title} (estimated "
              f"{cm.minutes(st.chunk.estimate_s):.1f} min, cap {max(limit, 0) / 60:.1f} min)", flush=True)
        if limit <= 0:
            status = "skipped"
        else:
            runner = globals()[st.runner]
            plan.run_chunk(st.chunk, make_context, lambda ctx, st=st, runner=runner: runner(ctx, st.settings), log,
                           deadline=True, limit_s=limit, keep_going=True)
            status = read_csv(log)[-1]["status"]
        results.append((st, status))
        summary = _summary(command, make_context(f"{command}-summary"), results, step_list, t0)
        _export(out, command, make_context(command).device_tag, summary)
    return 0 if all(status == "done" for _, status in results) else 3


def _summary(command, ctx, results, step_list, t0) -> Path:
    done = {st.chunk.number: status for st, status in results}
    rows = []
    for st in step_list:
        files = ", ".join(sorted(f.name for f in ctx.out.glob(f"{st.chunk.benchmark}-{ctx.device_tag}.*")
                                 if f.suffix in (".md", ".csv")))
        rows.append([st.chunk.number, st.chunk.title, f"{cm.minutes(st.chunk.estimate_s):.1f}",
                     done.get(st.chunk.number, "not reached"), files or "—"])
    path = ctx.path("md")
    path.write_text(f"# {command}\n\nDevice: **{ctx.device_name}** · {time() - t0:.0f} s since the command "
                    f"started (limit {WALL_LIMIT_S[command] / 60:.0f} min, install included)\n\n" +
                    markdown_table(["step", "what", "estimated min", "status", "files"], rows) + "\n")
    return path
