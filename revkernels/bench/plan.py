"""The GPU plan: `python -m revkernels.bench all --preset gpu` as resumable chunks of under 9 minutes.

Each chunk runs one benchmark of the gpu preset, or the part of it named by `only` (some depths, archs
or budgets); the benchmarks append every finished point to their device-tagged CSV in plots/ and skip
what is there, so a chunk stopped at its time limit (or a lost machine) resumes where it stopped.
`--chunk N` runs chunk N alone under a CHUNK_LIMIT_S deadline (probes are killed when it passes, the
chunk stops with everything finished on disk; run it again to go on), so a GPU window of 10-minute
commands can run the plan one chunk per command. Without `--chunk`, every chunk not yet done runs in
turn with no deadline. Finished chunks are recorded in plots/plan-<device>.csv.

Estimates come from revkernels.bench.cost_model (H100 SXM: 989 TFLOP/s bf16 dense at an assumed 35%
MFU, 3.35 TB/s; process start, CPU-side model build and torch.compile times as stated there).
"""
import traceback
from dataclasses import dataclass, field
from time import monotonic, perf_counter, strftime

from . import cost_model as cm
from .common import append_csv, markdown_table, read_csv

CHUNK_LIMIT_S = 510                  # 8.5 minutes: a chunk's deadline (a GPU command may run 10)
TOTAL_LIMIT_S = 30 * 60
LOG_COLUMNS = ("chunk", "title", "status", "seconds", "estimate_s", "device", "finished")


@dataclass
class Chunk:
    number: int
    benchmark: str
    title: str
    estimate_s: float
    only: dict = field(default_factory=dict)


# ------------------------------------------------------------------ estimates per benchmark

def _kernels_s():
    from .kernels import OPS, PRESETS
    p = PRESETS["gpu"]
    n_sizes = len(p["sizes"])
    compiles = len(OPS) * n_sizes * cm.COMPILE_S + len(OPS) * cm.COMPILE_S      # torch.compile, Triton JIT
    timings = n_sizes * (len(OPS) * 3 + 1) * 0.25                                 # do_bench: ~25 + 100 ms each
    return cm.PROCESS_START_S + compiles + timings


def _drift_s(depths):
    from .drift import DTYPES, PRESETS, SCHEMES
    p = PRESETS["gpu"]
    total = cm.PROCESS_START_S
    for L in depths:
        cfg = dict(p["shape"], n_layers=L, arch="midpoint", loss_chunk_tokens=p["loss_chunk_tokens"])
        n = sum(cm.n_params(cfg).values())
        step = cm.step_s(cfg, p["batch"])
        # float and exact models built on the CPU once per scheme and depth; per block dtype, float:
        # 2 forward passes (round trip) + 2 training steps (gradient check), exact: 2 training steps;
        # bf16: 1 fp32 autograd step (the bf16 noise)
        total += len(SCHEMES) * (2 * n / cm.CPU_INIT_PARAMS_PER_S + 1 * step)
        total += len(SCHEMES) * len(DTYPES) * (3 + 2 * cm.EXACT_STEP_FACTOR) * step
    # exact kernels' specialisations: three-term step and backward step for k = 0, 1, 2, Hamiltonian
    # coupling forward and inverse, each for fp32 and bf16 updates
    return total + 2 * (3 + 3 + 2) * cm.TRITON_JIT_S


def _exact_s():
    from .exact import A_VALUES, ARCHS, MODES, PRESETS
    side, p = PRESETS["gpu"]["side"], PRESETS["gpu"]["step"]
    total = 0.0
    for L in side["depths"]:            # side bits: exact and float bodies built, one forward each
        cfg = dict(side["shape"], n_layers=L, arch="midpoint_a", loss_chunk_tokens=0)
        total += len(A_VALUES) * (2 * sum(cm.n_params(cfg).values()) / cm.CPU_INIT_PARAMS_PER_S +
                                  cm.step_s(cfg, side["batch"]))
    cfg = dict(p["shape"], arch="midpoint", loss_chunk_tokens=p["loss_chunk_tokens"])
    n = sum(cm.n_params(cfg).values())
    per_model = n / cm.CPU_INIT_PARAMS_PER_S + (p["warmup"] + p["rounds"] * p["per_round"]) * \
        cm.step_s(cfg, p["batch"]) * (1 + cm.EXACT_STEP_FACTOR) / 2
    # exact kernels' bf16 specialisations: step and backward step for k = 0, 1, 2, coupling forward and inverse
    return total + cm.PROCESS_START_S + len(ARCHS) * len(MODES) * per_model + (3 + 3 + 2) * cm.TRITON_JIT_S


def _memory_depth_s(archs, depths):
    from .memory_depth import PRESETS
    p = PRESETS["gpu"]
    return sum(cm.probe_s(dict(p["shape"], n_layers=L, arch=a, loss_chunk_tokens=p["loss_chunk_tokens"]),
                          p["batch"], steps=2) for a in archs for L in depths)


def _max_batch_s(budgets, p=None):
    """Every configuration's search (max_batch.configs) under `budgets`, each probe also timing `time_steps`."""
    from .max_batch import PRESETS, configs
    p = p or PRESETS["gpu"]
    total = 0.0
    for _, cfg in configs(p):
        for i, (_, b) in enumerate(sorted(budgets, key=lambda b: b[1])):
            total += cm.search_probes(i == 0) * cm.probe_s(cfg, cm.max_batch(cfg, b), steps=2 + p["time_steps"])
    return total


def _throughput_s(depths):
    from .throughput_depth import PRESETS
    p = PRESETS["gpu"]
    total = 0.0
    for L in depths:
        for a in p["archs"]:
            cfg = dict(p["shape"], n_layers=L, arch=a, loss_chunk_tokens=p["loss_chunk_tokens"])
            if a in p["max_archs"]:                    # probes at 1/8 and 1/4 of the batch, then the timed run
                b = min(cm.max_batch(cfg, cm.H100_MEMORY_BYTES), p["cap"])
                total += cm.probe_s(cfg, b // 8, 2) + cm.probe_s(cfg, b // 4, 2)
                total += cm.probe_s(cfg, b, steps=p["warmup"] + p["steps"])
            n = sum(cm.n_params(cfg).values())         # common batch: built here, timed interleaved
            total += n / cm.CPU_INIT_PARAMS_PER_S + (p["common_warmup"] + p["rounds"] * p["per_round"]) * \
                cm.step_s(cfg, p["common_batch"])
    return total


def _frontier_s(p=None, configs=None):
    """frontier: each configuration built on the CPU, one memory step, warm-up and interleaved timed steps (and
    the baseline's again in every group after the first); plus the Triton JIT of the bf16 reversible kernels
    (step, inverse, backward step)."""
    from .frontier import GROUP, PRESETS, build_config, configurations, groups
    p = p or PRESETS["gpu"]
    configs = configs or configurations(p)
    timed = p["warmup"] + p["rounds"] * p["per_round"]
    total = 3 * cm.TRITON_JIT_S
    for label, method, k, policy in configs:
        cfg = build_config(p, method, k, policy)
        n = sum(cm.n_params(cfg).values())
        total += n / cm.CPU_INIT_PARAMS_PER_S + (1 + timed) * cm.step_s(cfg, p["batch"])
    extra_baselines = len(groups([c[0] for c in configs], p.get("group", GROUP))) - 1   # one baseline per group
    return total + extra_baselines * timed * cm.step_s(build_config(p, "baseline"), p["batch"])


SAMPLE_TOKEN_S = 0.01       # one batch-1 forward of a 12-layer GPT in eager mode: launch bound, ~10 ms


def _quality_s():
    from .quality import ARCHS, PRESETS, RETROFIT_ITERATIONS
    p = PRESETS["gpu"]
    total = cm.PROCESS_START_S + 5.0                   # + reading and hashing the corpus
    n_evals = p["steps"] // p["eval_every"] + 1
    for a in ARCHS:
        cfg = dict(p["model"], vocab_size=256, arch=a, loss_chunk_tokens=0)
        step = cm.step_s(cfg, p["batch"])
        total += p["steps"] * step + n_evals * p["eval_batches"] * step / 3 + p["sample_tokens"] * SAMPLE_TOKEN_S
    base = dict(p["model"], vocab_size=256, arch="baseline", loss_chunk_tokens=0)
    for k in RETROFIT_ITERATIONS:
        calls = 2 + k                                  # block calls per layer of the student: f_j, f_{j-1} k+1 times
        step = cm.step_s(dict(base, arch="midpoint"), p["batch"]) * calls + cm.step_s(base, p["batch"]) / 3
        n_evals = p["align_steps"] // p["align_eval_every"] + 1
        total += p["align_steps"] * step + n_evals * p["eval_batches"] * step / 2 + p["sample_tokens"] * SAMPLE_TOKEN_S
    return total


# ------------------------------------------------------------------ the plan

def gpu_plan() -> list:
    """The chunks, in the order they run."""
    from .drift import PRESETS as DR
    from .exact import ARCHS as EX_ARCHS
    from .exact import PRESETS as EX
    from .max_batch import PRESETS as MB
    from .memory_depth import PRESETS as MD
    from .throughput_depth import PRESETS as TD
    td = TD["gpu"]
    def depths(ds):
        return "L=" + "/".join(map(str, ds))

    md, mb = MD["gpu"], MB["gpu"]
    chunks = [("kernels", "kernels: 5 fused ops x eager / compile at 1M-256M elements, copy bandwidth", _kernels_s(),
               {}),
              ("drift", f"drift: 4 schemes, fp32 / bf16 blocks, GPT-2 small width, {depths(DR['gpu']['depths'])}",
               _drift_s(DR["gpu"]["depths"]), {}),
              ("exact", f"exact: exact vs float step time, {len(EX_ARCHS)} reversible archs, GPT-2 small, batch "
               f"{EX['gpu']['step']['batch']}; midpoint_a side bits", _exact_s(), {}),
              ("memory-depth", f"memory-depth: {len(md['archs'])} archs, GPT-2 small width, batch {md['batch']}, "
               f"{depths(md['depths'])}", _memory_depth_s(md["archs"], md["depths"]), {}),
              ("max-batch", f"max-batch: {', '.join(mb['archs'])}, hybrid k="
               f"{'/'.join(map(str, mb['hybrid']['stored']))}; GPT-2 small, T=1024; 24/40/48/80 GB",
               _max_batch_s(mb["budgets"]), {})]
    for ds in (td["depths"][:2], td["depths"][2:]):
        chunks.append(("throughput-depth", f"throughput-depth: d=512, {depths(ds)}; {' and '.join(td['max_archs'])} "
                       f"at max batch, +checkpoint at batch {td['common_batch']}", _throughput_s(ds),
                       {"n_layers": ds}))
    chunks.append(("frontier", "frontier: baseline, checkpoint, selective AC, midpoint stored_layers 0/3/6/9/12 "
                   "with / without store_policy; GPT-2 small, batch 8", _frontier_s(), {}))
    chunks.append(("quality", "quality: 5 archs, d=768 L=12 on bytes; retrofit of the trained baseline",
                   _quality_s(), {}))
    return [Chunk(i, name, title, est, only) for i, (name, title, est, only) in enumerate(chunks, 1)]


def plan_table(chunks, done=()) -> str:
    rows = [[c.number, c.benchmark, c.title, f"{cm.minutes(c.estimate_s):.1f}"] +
            (["done" if c.number in done else "to do"] if done is not None else []) for c in chunks]
    total = sum(c.estimate_s for c in chunks)
    header = ["chunk", "benchmark", "what", "estimated GPU min"] + (["status"] if done is not None else [])
    return (markdown_table(header, rows) + f"\n\nTotal: {cm.minutes(total):.1f} estimated GPU minutes in "
            f"{len(chunks)} chunks (limits: each chunk < 9 min, the plan < 30 min). Estimates: H100 SXM, "
            f"{cm.H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 at {cm.MFU:.0%} MFU, {cm.H100_HBM_BYTES_PER_S / 1e12:.2f} "
            f"TB/s; probe start-up {cm.PROCESS_START_S:.0f} s; torch.compile {cm.COMPILE_S:.0f} s per graph "
            f"(revkernels/bench/cost_model.py).")


def done_chunks(log_path, device_name) -> set:
    return {int(r["chunk"]) for r in read_csv(log_path) if r["status"] == "done" and r["device"] == device_name}


def run_chunk(chunk: Chunk, make_context, run_benchmark, log_path, deadline: bool, limit_s: float = CHUNK_LIMIT_S,
              keep_going: bool = False) -> bool:
    """Run one chunk; True when it finished, False when it stopped at its deadline (`limit_s` from now when
    `deadline`; rerun to resume) or, with `keep_going`, failed (the traceback is printed, status 'failed')."""
    from .common import ChunkTimeUp
    t0 = perf_counter()
    ctx = make_context(chunk.benchmark, only=chunk.only or None,
                       deadline=monotonic() + limit_s if deadline else None)
    try:
        print(run_benchmark(ctx), flush=True)
        status = "done"
    except ChunkTimeUp as stop:
        print(f"chunk {chunk.number} ({chunk.title}) stopped: {stop}. Every finished point is saved; "
              f"run `--chunk {chunk.number}` again to resume.", flush=True)
        status = "stopped"
    except Exception:  # noqa: BLE001 - gpu-check: one failing step must not cost the others their time
        if not keep_going:
            raise
        traceback.print_exc()
        status = "failed"
    append_csv(log_path, dict(chunk=chunk.number, title=chunk.title, status=status, seconds=perf_counter() - t0,
                              estimate_s=chunk.estimate_s, device=ctx.device_name, finished=strftime("%F %T")),
               LOG_COLUMNS)
    return status == "done"
