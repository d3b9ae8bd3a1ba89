"""kernels: effective bandwidth of each fused op against PyTorch eager and torch.compile of the same math.

Effective GB/s = bytes the fused op must read and write (fp32 states, bf16 f) / time, for the
same count whatever the provider, so a provider that makes extra passes shows a lower figure.
The reference line is the device's copy bandwidth (torch copy_ of an fp32 tensor, read + write)
measured in the same run on a large tensor (`copy_ref` elements: 256M on a GPU, 16M on a CPU, beyond
its caches); copies at each benchmarked size are recorded too. CUDA: triton.testing.do_bench (L2 flushed between
runs), median and p20/p80; CPU: time.perf_counter. Rows follow Liger-Kernel's schema.

Providers: `revkernels` (the public op: Triton on CUDA; on a CPU the Triton interpreter under
TRITON_INTERPRET=1, else revkernels.fallback, the same formulas in place), `eager` (revkernels.reference,
plain PyTorch with temporaries), `compile` (torch.compile of that same function).

On a CPU the report gives times only, as points at one size: bandwidth figures describe the fused
GPU kernels, which do not run there. There every (op, provider) and a copy of the same elements are
timed interleaved (common.interleaved_ms), so a load change or the allocator adapting to the first large
frees hits them alike. On a GPU, rows are appended per (op, size) as they finish; a rerun resumes.

Tiles: after each public op has run through Triton, the tile it ran with (`ops.tuned_config`: chosen by
triton.autotune per width, dtypes and op on a GPU; the interpreter's fixed tile on a CPU) is logged to
kernels-tiles.csv and to the report.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops
from .. import reference as ref
from .common import append_csv, figure, fused_path, interleaved_ms, markdown_table, progress, quantiles, read_csv, \
    time_ms, write_csv, write_report

PRESETS = {
    # sizes in elements (gpu: 1M .. 256M); copy_ref: the copy that gives the reference line
    "gpu": dict(sizes=(2 ** 20, 2 ** 24, 2 ** 26, 2 ** 28), copy_ref=2 ** 28, d=1024, compile=True),
    # cpu / tiny: one size, every (op, provider) timed interleaved in `rounds` rounds of `per_round` calls
    "cpu": dict(sizes=(2 ** 20,), d=1024, compile=True, warmup=5, rounds=10, per_round=5),
    "tiny": dict(sizes=(2 ** 12,), d=64, compile=False, warmup=1, rounds=2, per_round=1),
}
COLUMNS = ("op", "provider", "mode", "metric", "x", "median", "p20", "p80", "device")
TILE_COLUMNS = ("op", "D", "f_dtype", "BLOCK_M", "BLOCK_D", "num_warps", "VEC", "ALIGN", "tuned", "device")
MODE = "fp32 state, bf16 f"
A, C, ALPHA = -1.0, 1.0, 0.5     # a = -1 keeps repeated in-place backward steps bounded (period 2)


def _states(M, D, device, n):
    return [torch.randn(M, D, device=device) for _ in range(n)]


def _f(M, D, device):
    return torch.randn(M, D, device=device, dtype=torch.bfloat16)


def _eager_backward(A_, B, f, gA, gB, coef_grads):
    A_new, gA_new, gB_new, gf, da, dc = ref.rev_backward_step(A_, B, f, gA, gB, A, C, coef_grads)
    A_.copy_(A_new)
    gA.copy_(gA_new)
    gB.copy_(gB_new)
    return gf, da, dc


def _eager_backward_plain(A_, B, f, gA, gB):
    return _eager_backward(A_, B, f, gA, gB, False)


def _eager_backward_coef(A_, B, f, gA, gB):
    return _eager_backward(A_, B, f, gA, gB, True)


@dataclass
class KernelOp:
    """A fused op, the same math in PyTorch, its inputs, and the bytes it must move per element."""
    name: str
    bytes_per_elem: int
    inputs: Callable          # (M, D, device) -> tuple of tensors
    fused: Callable           # (*inputs) -> ...
    math: Callable            # (*inputs) -> ..., plain PyTorch


OPS = (
    KernelOp("rev_step", 4 + 4 + 2 + 4, lambda M, D, dev: (*_states(M, D, dev, 2), _f(M, D, dev)),
             lambda x, y, f: ops.rev_step(x, y, f, A, C), lambda x, y, f: ref.rev_step(x, y, f, A, C)),
    KernelOp("rev_inverse", 4 + 4 + 2 + 4, lambda M, D, dev: (*_states(M, D, dev, 2), _f(M, D, dev)),
             lambda x, y, f: ops.rev_inverse(x, y, f, A, C), lambda x, y, f: ref.rev_inverse(x, y, f, A, C)),
    # reads A, B, gA, gB (fp32) and f (bf16); writes A, gA, gB (fp32) and gf (bf16)
    KernelOp("rev_backward_step", 16 + 2 + 12 + 2,
             lambda M, D, dev: (*_states(M, D, dev, 2), _f(M, D, dev), *_states(M, D, dev, 2)),
             lambda *t: ops.rev_backward_step(*t, A, C), _eager_backward_plain),
    KernelOp("rev_backward_step+coef_grads", 16 + 2 + 12 + 2,
             lambda M, D, dev: (*_states(M, D, dev, 2), _f(M, D, dev), *_states(M, D, dev, 2)),
             lambda *t: ops.rev_backward_step(*t, A, C, coef_grads=True), _eager_backward_coef),
    KernelOp("coupling_step", 4 + 2 + 4, lambda M, D, dev: (*_states(M, D, dev, 1), _f(M, D, dev)),
             lambda x, g: ops.coupling_step(x, g, ALPHA), lambda x, g: ref.coupling_step(x, g, ALPHA)),
)


def bench_ms(fn, ctx, p) -> tuple:
    """(median, p20, p80) ms of fn()."""
    if ctx.device.type == "cuda":
        from triton.testing import do_bench
        return tuple(do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    return time_ms(fn, ctx.device, warmup=p["warmup"], reps=p["reps"])


def _fits(ctx, n_elems, bytes_per_elem) -> bool:
    """Inputs plus room for eager temporaries (up to ~8 fp32 tensors) in free device memory."""
    if ctx.device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(ctx.device)
    return n_elems * (bytes_per_elem + 32) < 0.9 * free


def _rows(op, provider, n, ms, bytes_moved, device) -> list:
    med, p20, p80 = ms
    gbps = [bytes_moved / (t * 1e6) for t in (med, p80, p20)]   # the slowest runs give the p20 bandwidth
    base = dict(op=op, provider=provider, mode=MODE, x=n, device=device)
    return [dict(base, metric="time_ms", median=med, p20=p20, p80=p80),
            dict(base, metric="gbps", median=gbps[0], p20=gbps[1], p80=gbps[2])]


def _measure_copy(ctx, p, n) -> list:
    if not _fits(ctx, n, 8):
        return []
    src, dst = _states(n // p["d"], p["d"], ctx.device, 2)
    return _rows("copy", "torch", n, bench_ms(lambda: dst.copy_(src), ctx, p), 8 * n, ctx.device_name)


def _measure_op(ctx, p, op, n, compiled, skipped) -> list:
    """Rows for `op` at n elements, each provider on the same inputs; what could not run goes to `skipped`."""
    at = f"{op.name} at {n / 2 ** 20:g}M elements"
    if not _fits(ctx, n, op.bytes_per_elem):
        skipped.append(f"{at}: does not fit in free device memory")
        return []
    args = op.inputs(n // p["d"], p["d"], ctx.device)
    providers = {"revkernels": op.fused, "eager": op.math}
    if compiled:
        providers["compile"] = compiled[op.name]
    rows = []
    for provider, fn in providers.items():
        try:
            ms = bench_ms(lambda: fn(*args), ctx, p)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            skipped.append(f"{at}, {provider}: out of memory")
            continue
        except Exception as err:  # noqa: BLE001 - e.g. torch.compile without a working toolchain
            if provider != "compile":
                raise
            skipped.append(f"{at}, compile: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
            continue
        rows += _rows(op.name, provider, n, ms, op.bytes_per_elem * n, ctx.device_name)
        if provider == "revkernels":
            log_tile(ctx, op.name, p["d"])
    return rows


def log_tile(ctx, op_name, D):
    """Record (and print) the tile of op `op_name`'s last Triton launch at width D with a bf16 f,
    replacing this device's earlier record of that op and width."""
    cfg = ops.tuned_config(op_name, D, torch.bfloat16)
    if cfg is None:
        return
    row = dict(cfg, op=op_name, D=D, f_dtype="bf16", device=ctx.device_name)
    path = ctx.path("csv", "tiles")
    key = (op_name, str(D), ctx.device_name)
    rows = [r for r in read_csv(path) if (r["op"], r["D"], r["device"]) != key] + [row]
    write_csv(path, rows, TILE_COLUMNS)
    print(f"kernels: {op_name} at D={D}, bf16 f: " + ", ".join(f"{k}={cfg[k]}" for k in TILE_COLUMNS[3:9]))


def _tiles_markdown(ctx) -> str:
    rows = [r for r in read_csv(ctx.path("csv", "tiles")) if r["device"] == ctx.device_name]
    if not rows:
        return ""
    if rows[0]["tuned"] == "True":
        how = "chosen by triton.autotune on this device"
    elif ctx.is_cpu:
        how = "the interpreter's fixed tile: nothing is tuned on a CPU"
    else:
        how = "the first candidate, untimed: REVKERNELS_AUTOTUNE=0"
    return (f"Tiles ({how}; `revkernels.ops.tuned_config(op, D, dtype)`):\n\n"
            + markdown_table(list(TILE_COLUMNS[:-1]), [[r[c] for c in TILE_COLUMNS[:-1]] for r in rows]))


def run(ctx, p=None) -> str:
    """`p`: the preset's settings (default PRESETS[ctx.preset]; gpu-check passes its own)."""
    p = p or PRESETS[ctx.preset]
    compiled = {op.name: torch.compile(op.math, dynamic=False) for op in OPS} if p["compile"] else None
    skipped = []
    with torch._dynamo.config.patch(recompile_limit=64):
        if ctx.is_cpu:
            rows = _measure_cpu(ctx, p, compiled, skipped)
            write_csv(ctx.path("csv"), rows, COLUMNS)
            return write_report(ctx, "Fused ops on the CPU: time per call", _cpu_markdown(ctx, p, rows, skipped),
                                _cpu_plot(ctx, p, rows))
        rows = _measure_gpu(ctx, p, compiled, skipped)
    return write_report(ctx, "Fused kernels: effective bandwidth", _markdown(ctx, p, rows, skipped),
                        _plot(ctx, p, rows))


def _measure_gpu(ctx, p, compiled, skipped) -> list:
    """Every size, op and provider, resuming from the CSV's rows of this device."""
    path = ctx.path("csv")
    rows = [dict(r, x=int(r["x"]), **{k: float(r[k]) for k in ("median", "p20", "p80")})
            for r in read_csv(path) if r["device"] == ctx.device_name]
    have = {(r["op"], r["x"]) for r in rows}
    for n in progress(sorted(set(p["sizes"]) | {p["copy_ref"]}), "kernels"):
        groups = [("copy", lambda: _measure_copy(ctx, p, n))]
        if n in p["sizes"]:
            groups += [(op.name, lambda op=op: _measure_op(ctx, p, op, n, compiled, skipped)) for op in OPS]
        for name, measure in groups:
            if (name, n) in have:
                continue
            ctx.check_time(f"kernels {name} at {n} elements")
            for row in measure():
                rows.append(row)
                append_csv(path, row, COLUMNS)
        torch.cuda.empty_cache()
    write_csv(path, rows, COLUMNS)
    return rows


def _measure_cpu(ctx, p, compiled, skipped) -> list:
    """time_ms rows of the copy and every (op, provider) at the preset's one size, timed interleaved."""
    n = p["sizes"][0]
    src, dst = _states(n // p["d"], p["d"], ctx.device, 2)
    fns = {("copy", "torch"): lambda: dst.copy_(src)}
    for op in OPS:
        args = op.inputs(n // p["d"], p["d"], ctx.device)
        providers = {"revkernels": op.fused, "eager": op.math}
        if compiled:
            providers["compile"] = compiled[op.name]
        for provider, fn in providers.items():
            try:
                fn(*args)
            except Exception as err:  # noqa: BLE001 - e.g. torch.compile without a working toolchain
                if provider != "compile":
                    raise
                skipped.append(f"{op.name}, compile: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                continue
            fns[(op.name, provider)] = lambda fn=fn, args=args: fn(*args)
            if provider == "revkernels":
                log_tile(ctx, op.name, p["d"])
    times = interleaved_ms(fns, ctx.device, p["warmup"], p["rounds"], p["per_round"])
    return [dict(op=op, provider=provider, mode=MODE, metric="time_ms", x=n, device=ctx.device_name,
                 **dict(zip(("median", "p20", "p80"), quantiles(ms)))) for (op, provider), ms in times.items()]


def _ms(rows, op, provider, n):
    want = (op, provider, n, "time_ms")
    return next((r for r in rows if (r["op"], r["provider"], r["x"], r["metric"]) == want), None)


def _ms_cell(r):
    return "—" if r is None else f"{r['median']:.3f} ({r['p20']:.3f}-{r['p80']:.3f})"


def _cpu_markdown(ctx, p, rows, skipped) -> str:
    n = max(p["sizes"])
    providers = ["revkernels", "eager", "compile"]
    table = []
    for op in OPS:
        cells = [_ms(rows, op.name, prov, n) for prov in providers]
        ours, eager, comp = cells
        ratio = [f"{eager['median'] / other['median']:.2f}x" if eager and other else "—" for other in (ours, comp)]
        table.append([op.name] + [_ms_cell(c) for c in cells] + ratio)
    header = ["op"] + [f"{prov} ms (p20-p80)" for prov in providers] + ["revkernels vs eager", "compile vs eager"]
    copy = _ms(rows, "copy", "torch", n)
    skipped_note = "".join(f"\n- skipped: {s}" for s in skipped)
    return f"""
On this CPU the public ops (`revkernels`) run the {fused_path(ctx.device)}; `eager` is the same math in plain
PyTorch with temporaries (revkernels.reference), `compile` its torch.compile. One size ({n / 2 ** 20:g}M elements,
tensors ({n // p['d']}, {p['d']}), fp32 states, bf16 f, scalar coefficients); every (op, provider) and the copy
timed interleaved, {p['rounds']} rounds of {p['per_round']} calls after {p['warmup']} warm-up calls; median and
p20-p80 over the rounds. It makes no bandwidth claim: the fused kernels are GPU code. For scale, a torch copy_ of
{n / 2 ** 20:g}M fp32 elements takes {_ms_cell(copy)} ms here. These ops are memory bound: on a CPU shared with
other work the times move between runs (up to ~2x, with the machine's memory traffic and the allocator's page
faults), while the interleaving keeps the ops of one run comparable with each other.

{markdown_table(header, table)}
{skipped_note}
{_tiles_markdown(ctx)}

Targets (GPU preset): rev_step / rev_inverse at >= 90% of the device's copy bandwidth for tensors of 64 MiB
and more (PyTorch eager needs ~5 passes over memory); the fused backward step >= 3x faster than the same
math in PyTorch eager.
"""


def _cpu_plot(ctx, p, rows):
    n = max(p["sizes"])
    fig, (ax,) = figure(1, ctx, f"Time per call at {n / 2 ** 20:g}M elements (fp32 states, bf16 f)", width=7.5)
    providers = ["revkernels", "eager", "compile"]
    for i, (prov, marker) in enumerate(zip(providers, ("o", "s", "^"))):
        pts = [(j + 0.12 * (i - 1), _ms(rows, op.name, prov, n)) for j, op in enumerate(OPS)]
        pts = [(x, r) for x, r in pts if r is not None]
        ax.errorbar([x for x, _ in pts], [r["median"] for _, r in pts],
                    yerr=[[r["median"] - r["p20"] for _, r in pts], [r["p80"] - r["median"] for _, r in pts]],
                    marker=marker, ls="none", capsize=3, label=prov)
    copy = _ms(rows, "copy", "torch", n)
    if copy:
        ax.axhline(copy["median"], color="black", ls=":", label="copy_ of the same elements")
    ax.set_xticks(range(len(OPS)), [op.name.replace("+", "+\n") for op in OPS], fontsize=7, rotation=20)
    ax.set_ylabel("ms per call")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig


def _gbps(rows, op, provider, n):
    want = (op, provider, n, "gbps")
    return next((r["median"] for r in rows if (r["op"], r["provider"], r["x"], r["metric"]) == want), None)


def copy_reference(rows):
    """(elements, GB/s) of the copy of the largest tensor measured (copy_ref, unless it did not fit)."""
    n = max(r["x"] for r in rows if r["op"] == "copy")
    return n, _gbps(rows, "copy", "torch", n)


def _fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def _markdown(ctx, p, rows, skipped) -> str:
    copy_n, copy_bw = copy_reference(rows)
    table = []
    for op in OPS:
        for n in p["sizes"]:
            fused, eager, comp = (_gbps(rows, op.name, prov, n) for prov in ("revkernels", "eager", "compile"))
            if fused is None:
                continue
            table.append([op.name, f"{n / 2 ** 20:g}M", f"{4 * n / 2 ** 20:g}", _fmt(fused), _fmt(eager), _fmt(comp),
                          f"{100 * fused / copy_bw:.0f}%", _fmt(eager and fused / eager, ".2f") + "x",
                          _fmt(comp and fused / comp, ".2f") + "x"])
    header = ["op", "elements", "state MiB", "revkernels GB/s", "eager GB/s", "compile GB/s",
              "revkernels / copy", "vs eager", "vs compile"]
    bytes_note = ", ".join(f"{op.name} {op.bytes_per_elem}" for op in OPS)
    skipped_note = "".join(f"\n- skipped: {s}" for s in skipped)
    return f"""
Fused path on this device: **{fused_path(ctx.device)}**. Tensors of shape (elements / {p['d']}, {p['d']}),
scalar coefficients. Bytes counted per element: {bytes_note}; copy 8.
Reference: copy bandwidth **{copy_bw:.1f} GB/s** (torch copy_, fp32, {copy_n / 2 ** 20:g}M elements, read + write).

{markdown_table(header, table)}
{skipped_note}
{_tiles_markdown(ctx)}

Targets: rev_step / rev_inverse >= 90% of the device's copy bandwidth for tensors of 64 MiB and more
(PyTorch eager needs ~5 passes over memory); the fused backward step >= 3x faster than PyTorch eager.
"""


def _plot(ctx, p, rows):
    fig, axes = figure(3, ctx, "Fused ops: effective bandwidth (fp32 states, bf16 f)", nrows=2, height=3.8)
    copy_n, copy_bw = copy_reference(rows)
    for ax, op in zip(axes, OPS):
        for provider, marker in (("revkernels", "o"), ("eager", "s"), ("compile", "^")):
            pts = [(n, _gbps(rows, op.name, provider, n)) for n in p["sizes"]]
            pts = [(n, g) for n, g in pts if g is not None]
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=provider)
        ax.axhline(copy_bw, color="black", ls=":", label=f"copy {copy_bw:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s")
        ax.set_ylim(bottom=0)
        ax.set_title(op.name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    n = max(p["sizes"])
    names = [op.name.replace("+", "+\n") for op in OPS]
    speedups = [(_gbps(rows, op.name, "revkernels", n) or 0) / (_gbps(rows, op.name, "eager", n) or 1) for op in OPS]
    axes[-1].bar(range(len(OPS)), speedups, color="tab:blue")
    axes[-1].axhline(1.0, color="black", lw=0.8)
    axes[-1].set_xticks(range(len(OPS)), names, fontsize=7, rotation=30)
    axes[-1].set_ylabel("revkernels / eager")
    axes[-1].set_title(f"speed-up over eager at {n / 2 ** 20:g}M elements", fontsize=10)
    return fig
