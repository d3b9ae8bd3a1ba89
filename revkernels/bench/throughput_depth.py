"""throughput-depth: training throughput against depth, at each arch's max batch and at one common
batch (paper Table 4: d=512, 8 heads, T=1024, L=16/32/64/96).

Max batch (GPU presets, and `tiny` for the tests): for each memory budget, depth and `max_archs` arch,
the max batch, then the median step time over `steps` timed steps after `warmup` steps at that batch,
in a fresh process. The gain over baseline is samples/s at each arch's own max batch. On a GPU the
max batch comes from two cheap probes at 1/8 and 1/4 of the analytic model's batch (cost_model): peak
memory is linear in the batch, and the line through them reaches the budget at the max batch; the timed
run at that batch confirms it (on an OOM it steps down by `tol` and tries again). Elsewhere it is
max-batch's bisection search within `tol`. Probes are logged to throughput-depth-probes.csv.

Common batch (every preset): the archs of one depth are built side by side in this process and timed
interleaved: `rounds` rounds, each timing `per_round` steps of every arch (the order reversed every
other round), so a load change on a shared machine hits every arch alike. Reported: each arch's
median step time over the rounds and the median (p20, p80) over rounds of its time / baseline's in the
same round -- the recompute overhead.

Rows are appended to the CSV as they finish and a rerun (or the next plan chunk) resumes.
"""
from matplotlib.ticker import ScalarFormatter

from ..models import ARCHS, GPTConfig
from ._probe import TrainStep, run_probe
from .common import MIB, append_csv, figure, interleaved_ms, markdown_table, progress, quantiles, read_csv, \
    write_csv, write_report
from .max_batch import Prober, search_bounds, search_max_batch, usable_budgets

PRESETS = {
    "gpu": dict(shape=dict(vocab_size=50304, seq_len=1024, d_model=512, n_heads=8), depths=(16, 32, 64, 96),
                archs=("baseline", "checkpoint", "midpoint"), max_archs=("baseline", "midpoint"), common_batch=16,
                budgets=(("full device", None),), loss_chunk_tokens=4096, start=64, cap=8192, tol=0.02, warmup=1,
                steps=2, isolate=True, rounds=5, per_round=1, common_warmup=2),
    "cpu": dict(shape=dict(vocab_size=256, seq_len=64, d_model=64, n_heads=4), depths=(4, 16),
                archs=ARCHS, max_archs=(), common_batch=8, budgets=(), loss_chunk_tokens=128,
                rounds=20, per_round=2, common_warmup=2),
    "tiny": dict(shape=dict(vocab_size=64, seq_len=16, d_model=32, n_heads=2), depths=(1, 2),
                 archs=("baseline", "midpoint"), max_archs=("baseline", "midpoint"), common_batch=2,
                 budgets=(("0.7 MiB", int(0.7 * MIB)),),
                 loss_chunk_tokens=16, start=2, cap=4, tol=0.0, warmup=1, steps=2, isolate=False,
                 rounds=2, per_round=1, common_warmup=1),
}
# Gal et al., Table 4 (d=512, 8 heads, T=1024): L -> (baseline max batch, samples/s),
# (midpoint max batch, samples/s), gain of midpoint over baseline in %.
PAPER_TABLE4 = {16: ((326, 488.8), (1550, 590.0), 20.7), 32: ((176, 263.1), (1374, 326.6), 24.1),
                64: ((88, 113.7), (1076, 169.1), 48.8), 96: ((52, 56.96), (874, 114.49), 101.0)}
COLUMNS = ("arch", "n_layers", "budget", "batch_kind", "batch", "capped", "step_ms", "step_ms_p20", "step_ms_p80",
           "samples_per_s", "tokens_per_s", "gain_vs_baseline_pct", "vs_baseline", "vs_baseline_p20",
           "vs_baseline_p80", "memory_bytes", "error", "device", "preset")
KEY = ("arch", "n_layers", "budget", "batch_kind")
COMMON = "common batch"
FLOATS = ("step_ms", "step_ms_p20", "step_ms_p80", "samples_per_s", "tokens_per_s", "vs_baseline",
          "vs_baseline_p20", "vs_baseline_p80")


def _cfg(p, arch, n_layers):
    return dict(p["shape"], n_layers=n_layers, arch=arch, loss_chunk_tokens=p["loss_chunk_tokens"])


def _base_row(ctx, arch, n_layers, budget_label, batch_kind, batch, **kw):
    return dict(dict(arch=arch, n_layers=n_layers, budget=budget_label, batch_kind=batch_kind, batch=batch,
                     device=ctx.device_name, preset=ctx.preset), **kw)


def time_max_batch(ctx, p, arch, n_layers, budget, batch, capped) -> dict:
    """Step time at `batch` in a fresh process (in-process for `tiny`)."""
    gpu = ctx.device.type == "cuda"
    res = run_probe(dict(cfg=_cfg(p, arch, n_layers), batch=batch, device=str(ctx.device), bf16=gpu,
                         budget_bytes=budget[1], warmup=p["warmup"], steps=p["steps"]), p["isolate"], ctx)
    row = _base_row(ctx, arch, n_layers, budget[0], "max", batch, capped=capped, memory_bytes=res["memory_bytes"],
                    error=res["error"])
    if res["ok"]:
        sps = batch / (res["step_ms"] / 1e3)
        row.update(step_ms=res["step_ms"], step_ms_p20=res["step_ms_p20"], step_ms_p80=res["step_ms_p80"],
                   samples_per_s=sps, tokens_per_s=sps * p["shape"]["seq_len"])
    return row


def time_common_batch(ctx, p, n_layers) -> list:
    """Rows of every arch at the common batch and depth `n_layers`, timed interleaved in this process."""
    gpu = ctx.device.type == "cuda"
    ctx.check_time(f"common batch L={n_layers}")
    steps = {a: TrainStep(GPTConfig(**_cfg(p, a, n_layers)), p["common_batch"], ctx.device, gpu) for a in p["archs"]}
    times = interleaved_ms(steps, ctx.device, p["common_warmup"], p["rounds"], p["per_round"])
    base = times.get("baseline")
    rows = []
    for arch, ms in times.items():
        med, p20, p80 = quantiles(ms)
        sps = p["common_batch"] / (med / 1e3)
        row = _base_row(ctx, arch, n_layers, COMMON, COMMON, p["common_batch"], step_ms=med, step_ms_p20=p20,
                        step_ms_p80=p80, samples_per_s=sps, tokens_per_s=sps * p["shape"]["seq_len"])
        if base:
            rel = quantiles([t / b for t, b in zip(ms, base)])
            row.update(vs_baseline=rel[0], vs_baseline_p20=rel[1], vs_baseline_p80=rel[2])
        rows.append(row)
    del steps
    if gpu:
        import gc

        import torch
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def run(ctx, p=None) -> str:
    """`p`: the preset's settings (default PRESETS[ctx.preset]; gpu-check passes its own)."""
    p = p or PRESETS[ctx.preset]
    budgets, notes = usable_budgets(ctx, p["budgets"])
    path, probes = ctx.path("csv"), ctx.path("csv", part="probes")
    done = {tuple(r[k] for k in KEY): _typed(r) for r in read_csv(path)
            if (r["device"], r["preset"]) == (ctx.device_name, ctx.preset)}

    def record(row):
        append_csv(path, row, COLUMNS)
        done[(row["arch"], str(row["n_layers"]), row["budget"], row["batch_kind"])] = row

    for L in progress(p["depths"], "throughput-depth"):
        if not ctx.selected(n_layers=L):
            continue
        for budget in budgets:
            for arch in p["max_archs"]:
                if (arch, str(L), budget[0], "max") not in done:
                    record(_max_batch_row(ctx, p, arch, L, budget, probes, done))
        if any((a, str(L), COMMON, COMMON) not in done for a in p["archs"]):
            for row in time_common_batch(ctx, p, L):
                record(row)
    rows = _all_rows(ctx, p, budgets, done)
    _fill_gains(rows)
    write_csv(path, [r for r in rows if r.get("batch") is not None], COLUMNS)
    return write_report(ctx, "Training throughput vs depth", _markdown(ctx, p, budgets, notes, rows),
                        _plot(ctx, p, budgets, rows))


def _extrapolated_row(ctx, p, arch, L, budget, prober, model_batch, cap):
    """GPU: the timed row at the batch where the line through two small probes meets the budget
    (stepping down by `tol` on an OOM); None when a small probe fails (the caller searches instead)."""
    for b in (max(1, model_batch // 8), max(2, model_batch // 4)):
        if not prober(b):
            return None
    batch = prober.predict()
    for _ in range(4):
        if batch is None or batch < 1:
            return None
        row = time_max_batch(ctx, p, arch, L, budget, min(batch, cap), capped=batch >= cap)
        if row.get("step_ms") is not None:
            return row
        batch = int(batch * (1 - p["tol"]))
    return None


def _max_batch_row(ctx, p, arch, L, budget, probes, done):
    cfg = _cfg(p, arch, L)
    start, cap, slope, model_batch = search_bounds(ctx, cfg, budget[1], p["start"], p["cap"])
    prober = Prober(ctx, probes, cfg, budget, isolate=p["isolate"], bytes_per_sample=slope)
    if model_batch:
        row = _extrapolated_row(ctx, p, arch, L, budget, prober, model_batch, cap)
        if row is not None:
            return row
    shallower = [int(done[k]["batch"]) for k in done
                 if k[0] == arch and k[2] == budget[0] and k[3] == "max" and int(k[1]) < L and done[k]["batch"]]
    if ctx.device.type != "cuda" and shallower:
        start = min(shallower)             # the batch of a shallower model bounds this one from above
    mb, capped = search_max_batch(prober, start=start, cap=cap, tol=p["tol"], predict=prober.predict)
    if not mb:
        return _base_row(ctx, arch, L, budget[0], "max", 0, error="batch 1 does not fit")
    return time_max_batch(ctx, p, arch, L, budget, mb, capped)


def _all_rows(ctx, p, budgets, done):
    """One row per task of the preset: measured, or a placeholder with no numbers."""
    keys = [(a, L, b[0], "max") for b in budgets for a in p["max_archs"] for L in p["depths"]]
    keys += [(a, L, COMMON, COMMON) for L in p["depths"] for a in p["archs"]]
    return [done.get((a, str(L), b, k)) or dict(arch=a, n_layers=L, budget=b, batch_kind=k)
            for a, L, b, k in keys]


def _typed(r: dict) -> dict:
    """A CSV row with its numbers parsed back."""
    out = dict(r, n_layers=int(r["n_layers"]), batch=int(r["batch"]))
    for k in FLOATS:
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
    header = ["n_layers"] + [f"{a}: batch, samples/s, gain" for a in p["max_archs"]]
    if paper:
        header += ["paper baseline", "paper midpoint", "paper gain"]
    table = []
    for L in p["depths"]:
        cells = [L]
        for a in p["max_archs"]:
            r = _find(rows, a, L, budget)
            if r.get("batch") is None:
                cells.append("not run yet")
                continue
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
        cells = [L]
        for a in p["archs"]:
            r = _find(rows, a, L, COMMON)
            if r.get("step_ms") is None:
                cells.append("not run yet")
                continue
            cells.append(f"{_num(r['step_ms'])} ms, {_num(r.get('vs_baseline'), '.2f')}x "
                         f"({_num(r.get('vs_baseline_p20'), '.2f')}-{_num(r.get('vs_baseline_p80'), '.2f')})")
        table.append(cells)
    return markdown_table(["n_layers"] + [f"{a}: step, vs baseline (p20-p80)" for a in p["archs"]], table)


def _markdown(ctx, p, budgets, notes, rows) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in p["shape"].items())
    gpu = ctx.device.type == "cuda"
    parts = [f"""
Shape: {shape}, loss_chunk_tokens={p['loss_chunk_tokens']} for every arch; AdamW;
{'bf16 autocast' if gpu else 'fp32'}; {'' if gpu else 'one process, '}samples/s = batch / step time.""".strip()]
    parts += [f"- {n}" for n in notes]
    for label, _ in budgets:
        parts.append(f"At each arch's max batch, budget {label} (max batch within {100 * p['tol']:g}%; step time: "
                     f"median of {p['steps']} steps after {p['warmup']} warm-up steps; gain = samples/s over "
                     f"baseline's at its own max batch):\n\n{_max_table(ctx, p, rows, label)}")
    if p["archs"]:
        parts.append(f"At the common batch {p['common_batch']}: the archs of each depth timed interleaved, "
                     f"{p['rounds']} rounds of {p['per_round']} step(s) each after {p['common_warmup']} warm-up "
                     f"steps; step = median over rounds, vs baseline = median (p20-p80) over rounds of the time ratio "
                     f"to baseline's in the same round, i.e. the recompute overhead:\n\n{_common_table(p, rows)}")
    paper = markdown_table(["n_layers", "baseline batch", "baseline samples/s", "midpoint batch",
                            "midpoint samples/s", "gain"],
                           [[L, bb, bs, mb, ms, f"+{g}%"] for L, ((bb, bs), (mb, ms), g) in PAPER_TABLE4.items()])
    parts.append(f"Paper (Gal et al., Table 4, d=512, 8 heads, T=1024, at each max batch):\n\n{paper}")
    parts.append("Targets: a reversible training step <= 1.30x baseline's time at the same batch (recompute "
                 "costs ~4/3 of the FLOPs; the paper reports 30-50% overhead) and <= 1.0x per-layer checkpointing's "
                 "(on a GPU, GPT-2 small shape); samples/s at each arch's max batch above the paper's gains of "
                 "+20.7/+24.1/+48.8/+101% at L=16/32/64/96.")
    if not gpu:
        parts.append("On a CPU the ratios are those of small fp32 shapes run by PyTorch's CPU kernels, where "
                     "per-op overhead weighs more than on a GPU; they show the recompute's cost, not the GPU targets.")
    return "\n\n".join(parts)


def _plot(ctx, p, budgets, rows):
    fig, axes = figure(2, ctx, "Training throughput vs depth", nrows=2 if budgets else 1)
    for a in p["archs"]:
        rs = [_find(rows, a, L, COMMON) for L in p["depths"]]
        axes[0].plot(p["depths"], [r.get("samples_per_s") for r in rs], marker="o", label=a)
        med = [r.get("vs_baseline") for r in rs]
        err = [[(m - r["vs_baseline_p20"]) if m is not None else 0 for m, r in zip(med, rs)],
               [(r["vs_baseline_p80"] - m) if m is not None else 0 for m, r in zip(med, rs)]]
        axes[1].errorbar(p["depths"], [m if m is not None else float("nan") for m in med], yerr=err, marker="o",
                         capsize=3, label=a)
    axes[0].set_title(f"samples/s at common batch {p['common_batch']}", fontsize=10)
    axes[1].set_title("step time / baseline's, same round (median, p20-p80)", fontsize=10)
    axes[1].axhline(1.0, color="black", lw=0.8)
    for (label, _), ls in zip(budgets, ("-", "--", ":")):
        for a, color in zip(p["max_archs"], ("tab:blue", "tab:orange", "tab:green")):
            rs = [_find(rows, a, L, label) for L in p["depths"]]
            axes[2].plot(p["depths"], [r.get("samples_per_s") for r in rs], ls=ls, marker="o", color=color,
                         label=f"{a}, {label}")
            axes[3].plot(p["depths"], [r.get("batch") for r in rs], ls=ls, marker="o", color=color,
                         label=f"{a}, {label}")
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
        if ax.get_legend_handles_labels()[0]:      # gpu-table4 draws no common-batch curves
            ax.legend(fontsize=7)
    return fig
