"""throughput-depth: training throughput against depth, at each arch's max batch and at one common
batch (paper Table 4: d=512, 8 heads, T=1024, L=16/32/64/96).

For each memory budget (the whole device, and 24 GB emulated as in max-batch), depth and arch:
the max batch (max-batch's search, within `tol`, probes logged to throughput-depth-probes.csv),
then the median step time over `steps` timed steps after `warmup` steps at that batch (CUDA events;
a fresh process per point on a GPU). At the common batch the time ratio to baseline is the pure
recompute overhead. Rows are appended to the CSV as they finish and a rerun resumes; the gain
over baseline (samples/s at each arch's own max batch) is filled in when the sweep completes.
"""
from matplotlib.ticker import ScalarFormatter

from ..models import ARCHS
from ._probe import run_probe
from .common import GIB, MIB, append_csv, figure, markdown_table, progress, read_csv, write_csv, write_report
from .max_batch import Prober, search_max_batch, usable_budgets

PRESETS = {
    "gpu": dict(shape=dict(vocab_size=50304, seq_len=1024, d_model=512, n_heads=8), depths=(16, 32, 64, 96),
                archs=("baseline", "checkpoint", "midpoint"), common_batch=16,
                budgets=(("full device", None), ("24 GB", 24 * GIB)), loss_chunk_tokens=4096,
                start=64, cap=8192, tol=0.01, warmup=3, steps=10, isolate=True),
    "cpu": dict(shape=dict(vocab_size=256, seq_len=64, d_model=64, n_heads=4), depths=(2, 4, 8, 16),
                archs=ARCHS, common_batch=8, budgets=(), loss_chunk_tokens=128, warmup=3, steps=15),
    "tiny": dict(shape=dict(vocab_size=64, seq_len=16, d_model=32, n_heads=2), depths=(1, 2),
                 archs=("baseline", "midpoint"), common_batch=2, budgets=(("0.7 MiB", int(0.7 * MIB)),),
                 loss_chunk_tokens=16, start=2, cap=4, tol=0.0, warmup=1, steps=2, isolate=False),
}
# Gal et al., Table 4 (d=512, 8 heads, T=1024): L -> (baseline max batch, samples/s),
# (midpoint max batch, samples/s), gain of midpoint over baseline in %.
PAPER_TABLE4 = {16: ((326, 488.8), (1550, 590.0), 20.7), 32: ((176, 263.1), (1374, 326.6), 24.1),
                64: ((88, 113.7), (1076, 169.1), 48.8), 96: ((52, 56.96), (874, 114.49), 101.0)}
COLUMNS = ("arch", "n_layers", "budget", "batch_kind", "batch", "capped", "step_ms", "step_ms_p20", "step_ms_p80",
           "samples_per_s", "tokens_per_s", "gain_vs_baseline_pct", "memory_bytes", "error", "device", "preset")
KEY = ("arch", "n_layers", "budget", "batch_kind")
COMMON = "common batch"


def _cfg(p, arch, n_layers):
    return dict(p["shape"], n_layers=n_layers, arch=arch, loss_chunk_tokens=p["loss_chunk_tokens"])


def time_point(ctx, p, arch, n_layers, budget, batch_kind, batch, capped=False) -> dict:
    gpu = ctx.device.type == "cuda"
    res = run_probe(dict(cfg=_cfg(p, arch, n_layers), batch=batch, device=str(ctx.device), bf16=gpu,
                         budget_bytes=budget[1], warmup=p["warmup"], steps=p["steps"]), isolate=gpu)
    row = dict(arch=arch, n_layers=n_layers, budget=budget[0], batch_kind=batch_kind, batch=batch, capped=capped,
               memory_bytes=res["memory_bytes"], error=res["error"], device=ctx.device_name, preset=ctx.preset)
    if res["ok"]:
        sps = batch / (res["step_ms"] / 1e3)
        row.update(step_ms=res["step_ms"], step_ms_p20=res["step_ms_p20"], step_ms_p80=res["step_ms_p80"],
                   samples_per_s=sps, tokens_per_s=sps * p["shape"]["seq_len"])
    return row


def _tasks(p, budgets):
    """(arch, n_layers, budget, batch_kind), depths ascending per arch so each max batch bounds the next."""
    tasks = [(a, L, b, "max") for b in budgets for a in p["archs"] for L in p["depths"]]
    return tasks + [(a, L, (COMMON, None), COMMON) for L in p["depths"] for a in p["archs"]]


def run(ctx) -> str:
    p = PRESETS[ctx.preset]
    budgets, notes = usable_budgets(ctx, p["budgets"])
    path, probes = ctx.path("csv"), ctx.path("csv", part="probes")
    done = {tuple(r[k] for k in KEY): r for r in read_csv(path)
            if (r["device"], r["preset"]) == (ctx.device_name, ctx.preset)}
    rows, last_max = [], {}
    for arch, L, budget, kind in progress(_tasks(p, budgets), "throughput-depth"):
        key = (arch, str(L), budget[0], kind)
        if key in done:
            row = _typed(done[key])
        elif kind == COMMON:
            row = time_point(ctx, p, arch, L, budget, kind, p["common_batch"])
        else:
            prober = Prober(ctx, probes, _cfg(p, arch, L), budget, isolate=p["isolate"])
            start = last_max.get((arch, budget[0])) or p["start"]
            mb, capped = search_max_batch(prober, start=start, cap=p["cap"], tol=p["tol"], predict=prober.predict)
            row = (time_point(ctx, p, arch, L, budget, kind, mb, capped) if mb else
                   dict(arch=arch, n_layers=L, budget=budget[0], batch_kind=kind, batch=0, error="batch 1 does not fit",
                        device=ctx.device_name, preset=ctx.preset))
        if key not in done:
            append_csv(path, row, COLUMNS)
        if kind == "max":
            last_max[(arch, budget[0])] = row["batch"]
        rows.append(row)
    _fill_gains(rows)
    write_csv(path, rows, COLUMNS)
    return write_report(ctx, "Training throughput vs depth", _markdown(ctx, p, budgets, notes, rows),
                        _plot(ctx, p, budgets, rows))


def _typed(r: dict) -> dict:
    """A CSV row with its numbers parsed back."""
    out = dict(r, n_layers=int(r["n_layers"]), batch=int(r["batch"]))
    for k in ("step_ms", "step_ms_p20", "step_ms_p80", "samples_per_s", "tokens_per_s"):
        out[k] = float(r[k]) if r.get(k) else None
    return out


def _fill_gains(rows):
    for r in rows:
        base = _find(rows, "baseline", r["n_layers"], r["budget"])
        ok = r.get("samples_per_s") and base and base.get("samples_per_s")
        r["gain_vs_baseline_pct"] = 100 * (r["samples_per_s"] / base["samples_per_s"] - 1) if ok else None


def _find(rows, arch, L, budget):
    return next((r for r in rows if (r["arch"], r["n_layers"], r["budget"]) == (arch, L, budget)), None)


def _num(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def _max_table(ctx, p, rows, budget) -> str:
    paper = ctx.device.type == "cuda" and budget == "full device"
    header = ["n_layers"] + [f"{a}: batch, samples/s, gain" for a in p["archs"]]
    if paper:
        header += ["paper baseline", "paper midpoint", "paper gain"]
    table = []
    for L in p["depths"]:
        cells = [L]
        for a in p["archs"]:
            r = _find(rows, a, L, budget)
            b = (">= " if str(r.get("capped")) == "True" else "") + str(r["batch"])
            cells.append(f"{b}, {_num(r.get('samples_per_s'), '.2f')}, {_num(r.get('gain_vs_baseline_pct'), '+.1f')}%")
        if paper and L in PAPER_TABLE4:
            (bb, bs), (mb, ms), gain = PAPER_TABLE4[L]
            cells += [f"{bb}, {bs}", f"{mb}, {ms}", f"+{gain}%"]
        elif paper:
            cells += ["—"] * 3
        table.append(cells)
    return markdown_table(header, table)


def _common_table(p, rows) -> str:
    table = []
    for L in p["depths"]:
        base = _find(rows, "baseline", L, COMMON)
        cells = [L]
        for a in p["archs"]:
            r = _find(rows, a, L, COMMON)
            rel = r.get("step_ms") and base and base.get("step_ms") and r["step_ms"] / base["step_ms"]
            cells.append(f"{_num(r.get('step_ms'))} ms, {_num(rel, '.2f')}x")
        table.append(cells)
    return markdown_table(["n_layers"] + [f"{a}: step, vs baseline" for a in p["archs"]], table)


def _markdown(ctx, p, budgets, notes, rows) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in p["shape"].items())
    parts = [f"""
Shape: {shape}, loss_chunk_tokens={p['loss_chunk_tokens']} for every arch; AdamW;
{'bf16 autocast' if ctx.device.type == 'cuda' else 'fp32'}. Step time: median over {p['steps']} steps after
{p['warmup']} warm-up steps (p20/p80 in the CSV); samples/s = batch / step time.""".strip()]
    parts += [f"- {n}" for n in notes]
    for label, _ in budgets:
        parts.append(f"At each arch's max batch, budget {label} (max batch within {100 * p['tol']:g}%; gain = "
                     f"samples/s over baseline's at its own max batch):\n\n{_max_table(ctx, p, rows, label)}")
    parts.append(f"At the common batch {p['common_batch']} (time relative to baseline = recompute overhead):\n\n"
                 f"{_common_table(p, rows)}")
    paper = markdown_table(["n_layers", "baseline batch", "baseline samples/s", "midpoint batch",
                            "midpoint samples/s", "gain"],
                           [[L, bb, bs, mb, ms, f"+{g}%"] for L, ((bb, bs), (mb, ms), g) in PAPER_TABLE4.items()])
    parts.append(f"Paper (Gal et al., Table 4, d=512, 8 heads, T=1024, at each max batch):\n\n{paper}")
    parts.append("Targets (DESIGN section 4): reversible step <= 1.30x baseline's time at the same batch, <= 1.0x "
                 "checkpoint's; gains at max batch above the paper's +20.7/+24.1/+48.8/+101%.")
    return "\n\n".join(parts)


def _plot(ctx, p, budgets, rows):
    fig, axes = figure(2, ctx, "Training throughput vs depth", nrows=2 if budgets else 1)
    for a in p["archs"]:
        rs = [_find(rows, a, L, COMMON) for L in p["depths"]]
        axes[0].plot(p["depths"], [r.get("samples_per_s") for r in rs], marker="o", label=a)
        base = [_find(rows, "baseline", L, COMMON) for L in p["depths"]]
        axes[1].plot(p["depths"], [r["step_ms"] / b["step_ms"] if r.get("step_ms") and b.get("step_ms") else None
                                   for r, b in zip(rs, base)], marker="o", label=a)
    axes[0].set_title(f"samples/s at common batch {p['common_batch']}", fontsize=10)
    axes[1].set_title("step time / baseline's (common batch)", fontsize=10)
    axes[1].axhline(1.0, color="black", lw=0.8)
    for (label, _), ls in zip(budgets, ("-", "--", ":")):
        for a, color in zip(p["archs"], ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")):
            rs = [_find(rows, a, L, label) for L in p["depths"]]
            axes[2].plot(p["depths"], [r.get("samples_per_s") for r in rs], ls=ls, marker="o", color=color,
                         label=f"{a}, {label}")
            axes[3].plot(p["depths"], [r["batch"] for r in rs], ls=ls, marker="o", color=color, label=f"{a}, {label}")
    if budgets:
        if ctx.device.type == "cuda":
            Ls = [L for L in p["depths"] if L in PAPER_TABLE4]
            for i, (name, marker) in enumerate((("baseline", "x"), ("midpoint", "*"))):
                axes[2].scatter(Ls, [PAPER_TABLE4[L][i][1] for L in Ls], marker=marker, color="black", zorder=3,
                                label=f"paper {name}")
                axes[3].scatter(Ls, [PAPER_TABLE4[L][i][0] for L in Ls], marker=marker, color="black", zorder=3,
                                label=f"paper {name}")
        axes[2].set_title("samples/s at each arch's max batch", fontsize=10)
        axes[3].set_title("max batch", fontsize=10)
        axes[3].set_yscale("log", base=2)
        axes[3].yaxis.set_major_formatter(ScalarFormatter())
    for ax in axes:
        ax.set_xlabel("n_layers")
        ax.set_xticks(p["depths"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig
