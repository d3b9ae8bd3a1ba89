"""exact: what exact mode (`exact=True`, int64 fixed-point states) costs in time and memory.

Step time: for each reversible arch, GPT(exact=False) and GPT(exact=True) of one shape, same batch and
weights, one AdamW training step each (forward + backward + optimizer step; bf16 autocast on a GPU),
built side by side in this process and timed interleaved (`interleaved_ms`: `rounds` rounds of
`per_round` steps of every model, the order reversed every other round). Reported: each model's median
step time over the rounds, and the median (p20, p80) over rounds of exact / float in the same round.
Target: <= 1.05x.

Side bits: exact midpoint_a with a_j = m_j / 2^k_j stores k_j bits per element per layer (a = +-1: none).
For constant dyadic a and for eq. 3.7 draws (rounded to multiples of 1/4), at several depths, one forward
of the exact GPT body: measured = bytes of the side-information tensors the forward kept for its
backward (read off its autograd node), beside the stack's `last_side_info_bytes` and the formula
sum_j k_j * B*T*d / 8. Compared with what the same body saves for backward (saved_tensors_hooks,
parameters excluded): exact reversible (two int64 states and the input, any depth), and float with
`reversible = False` (ordinary autograd, every block's activations: what a non-reversible model stores).

Rows are appended to the CSVs as they finish and a rerun resumes.
"""
import warnings

import torch

from ..fixed_point import dyadic_parts
from ..memory import SavedTensorBytes
from ..models import GPT, GPTConfig
from ._probe import TrainStep
from .common import append_csv, figure, interleaved_ms, markdown_table, progress, quantiles, read_csv, \
    write_csv, write_report

ARCHS = ("midpoint", "leapfrog", "midpoint_a", "hamiltonian")
MODES = ("float", "exact")
TARGET = 1.05
PRESETS = {
    "gpu": dict(step=dict(shape=dict(vocab_size=50304, seq_len=1024, d_model=768, n_heads=12, n_layers=12),
                          batch=8, loss_chunk_tokens=4096, warmup=2, rounds=5, per_round=2),
                side=dict(shape=dict(vocab_size=50304, seq_len=1024, d_model=768, n_heads=12), batch=2,
                          depths=(12,))),
    "cpu": dict(step=dict(shape=dict(vocab_size=256, seq_len=64, d_model=64, n_heads=4, n_layers=4),
                          batch=8, loss_chunk_tokens=128, warmup=2, rounds=20, per_round=2),
                side=dict(shape=dict(vocab_size=256, seq_len=32, d_model=64, n_heads=4), batch=2,
                          depths=(4, 16, 32))),
    "tiny": dict(step=dict(shape=dict(vocab_size=64, seq_len=8, d_model=32, n_heads=2, n_layers=2),
                           batch=2, loss_chunk_tokens=8, warmup=1, rounds=2, per_round=1),
                 side=dict(shape=dict(vocab_size=64, seq_len=8, d_model=32, n_heads=2), batch=1,
                           depths=(1, 3))),
}
# midpoint_a's a: a label and the GPTConfig.a (None: eq. 3.7 draws, rounded to multiples of 1/4 in exact mode)
A_VALUES = (("1", 1.0), ("-1", -1.0), ("0.5", 0.5), ("-0.75", -0.75), ("0.625", 0.625), ("129/256", 129 / 256),
            ("eq. 3.7 draws", None))
STEP_COLUMNS = ("arch", "mode", "n_layers", "batch", "step_ms", "step_ms_p20", "step_ms_p80", "exact_vs_float",
                "exact_vs_float_p20", "exact_vs_float_p80", "rounds", "device", "preset")
SIDE_COLUMNS = ("a", "n_layers", "batch", "seq_len", "d_model", "side_bits", "side_bytes_measured",
                "side_bytes_reported", "side_bytes_formula", "exact_saved_bytes", "autograd_saved_bytes",
                "device", "preset")


def _mine(ctx, rows):
    return [r for r in rows if (r["device"], r["preset"]) == (ctx.device_name, ctx.preset)]


# ---------------------------------------------------------------- step time

def time_steps(ctx, p) -> list:
    """Rows of every (arch, mode) at the step shape, timed interleaved in this process."""
    gpu = ctx.device.type == "cuda"
    steps = {(a, m): TrainStep(GPTConfig(**p["shape"], arch=a, loss_chunk_tokens=p["loss_chunk_tokens"],
                                         exact=m == "exact"), p["batch"], ctx.device, gpu)
             for a in ARCHS for m in MODES}
    times = interleaved_ms(steps, ctx.device, p["warmup"], p["rounds"], p["per_round"])
    rows = []
    for (arch, mode), ms in times.items():
        med, p20, p80 = quantiles(ms)
        rel = quantiles([t / f for t, f in zip(ms, times[(arch, "float")])])
        rows.append(dict(arch=arch, mode=mode, n_layers=p["shape"]["n_layers"], batch=p["batch"], step_ms=med,
                         step_ms_p20=p20, step_ms_p80=p80, exact_vs_float=rel[0], exact_vs_float_p20=rel[1],
                         exact_vs_float_p80=rel[2], rounds=p["rounds"], device=ctx.device_name, preset=ctx.preset))
    return rows


# ---------------------------------------------------------------- side bits

def _body_input(model, batch, device):
    T = model.cfg.seq_len
    idx = torch.randint(model.cfg.vocab_size, (batch, T), device=device)
    return model.wte(idx) + model.wpe(torch.arange(T, device=device))


def measure_side(ctx, p, label, a, n_layers) -> dict:
    """Side-information bytes of one forward of the exact midpoint_a body, measured and predicted."""
    cfg = dict(p["shape"], n_layers=n_layers, arch="midpoint_a", a=a, loss_chunk_tokens=0)
    torch.manual_seed(0)
    exact = GPT(GPTConfig(**cfg, exact=True)).to(ctx.device)
    x = _body_input(exact, p["batch"], ctx.device)
    with SavedTensorBytes(exclude=exact.parameters()) as saved:
        y = exact.body(x)
    measured = sum(t.numel() * t.element_size() for t in y.grad_fn.sides if t is not None)
    bits = sum(dyadic_parts(a_j)[1] for a_j in exact.body.a)
    row = dict(a=label, n_layers=n_layers, batch=p["batch"], seq_len=cfg["seq_len"], d_model=cfg["d_model"],
               side_bits=bits, side_bytes_measured=measured, side_bytes_reported=exact.body.last_side_info_bytes,
               side_bytes_formula=bits * x.numel() // 8, exact_saved_bytes=saved.bytes)
    del y, exact
    torch.manual_seed(0)
    with warnings.catch_warnings():         # a float stack with |a| < 1 warns of drift: only its memory is used
        warnings.filterwarnings("ignore", message="the coefficients amplify")
        ref = GPT(GPTConfig(**cfg)).to(ctx.device)
    ref.body.reversible = False
    with SavedTensorBytes(exclude=ref.parameters()) as saved:
        ref.body(x.detach())
    return dict(row, autograd_saved_bytes=saved.bytes, device=ctx.device_name, preset=ctx.preset)


# ---------------------------------------------------------------- run

def run(ctx) -> str:
    p = PRESETS[ctx.preset]
    step_path, side_path = ctx.path("csv"), ctx.path("csv", part="side-bits")
    steps = _mine(ctx, read_csv(step_path))
    if len(steps) < len(ARCHS) * len(MODES):
        ctx.check_time("exact vs float step time")
        steps = time_steps(ctx, p["step"])
        write_csv(step_path, steps, STEP_COLUMNS)
    side = {(r["a"], int(r["n_layers"])): r for r in _mine(ctx, read_csv(side_path))}
    points = [(label, a, L) for label, a in A_VALUES for L in p["side"]["depths"]]
    for label, a, L in progress(points, "exact side bits"):
        if (label, L) not in side:
            ctx.check_time(f"side bits a={label} L={L}")
            side[(label, L)] = measure_side(ctx, p["side"], label, a, L)
            append_csv(side_path, side[(label, L)], SIDE_COLUMNS)
    sides = [side[(label, L)] for label, _, L in points]
    write_csv(side_path, sides, SIDE_COLUMNS)
    steps = [_typed(r, STEP_COLUMNS[4:10]) for r in steps]
    sides = [_typed(r, SIDE_COLUMNS[5:11], int) for r in sides]
    return write_report(ctx, "Exact mode: step time and side bits", _markdown(ctx, p, steps, sides),
                        _plot(ctx, p, steps, sides))


def _typed(r, keys, kind=float):
    return dict(r, n_layers=int(r["n_layers"]), **{k: kind(float(r[k])) for k in keys})


def _step_table(steps) -> str:
    find = {(r["arch"], r["mode"]): r for r in steps}
    table = []
    for a in ARCHS:
        f, e = find[(a, "float")], find[(a, "exact")]
        ratio = e["exact_vs_float"]
        table.append([a, f"{f['step_ms']:.1f}", f"{e['step_ms']:.1f}",
                      f"{ratio:.2f}x ({e['exact_vs_float_p20']:.2f}-{e['exact_vs_float_p80']:.2f})",
                      "yes" if ratio <= TARGET else "no"])
    return markdown_table(["arch", "float step ms", "exact step ms", "exact / float (p20-p80)",
                           f"<= {TARGET}x"], table)


def _side_table(sides) -> str:
    table = [[r["a"], r["n_layers"], r["side_bits"], r["side_bytes_measured"], r["side_bytes_reported"],
              r["side_bytes_formula"], f"{r['side_bytes_measured'] / r['n_layers']:.0f}", r["exact_saved_bytes"],
              f"{r['side_bytes_measured'] + r['exact_saved_bytes']}", r["autograd_saved_bytes"],
              f"{(r['side_bytes_measured'] + r['exact_saved_bytes']) / r['autograd_saved_bytes']:.3f}"]
             for r in sides]
    return markdown_table(["a", "n_layers", "sum_j k_j (bits/element)", "side bytes measured", "reported",
                           "formula sum k_j*B*T*d/8", "measured per layer", "exact saved bytes (states)",
                           "exact total", "float autograd saved bytes", "exact total / autograd"], table)


def _markdown(ctx, p, steps, sides) -> str:
    s, sd = p["step"], p["side"]
    shape = ", ".join(f"{k}={v}" for k, v in s["shape"].items())
    side_shape = ", ".join(f"{k}={v}" for k, v in sd["shape"].items())
    gpu = ctx.device.type == "cuda"
    ok = all(r["side_bytes_measured"] == r["side_bytes_formula"] == r["side_bytes_reported"] for r in sides)
    worst = max(r["exact_vs_float"] for r in steps)
    parts = [f"""
Step time: {shape}, batch {s['batch']}, loss_chunk_tokens={s['loss_chunk_tokens']}; one AdamW training step
(forward + backward + optimizer step), {'bf16 autocast' if gpu else 'fp32 blocks'}; float (`exact=False`) and
exact (`exact=True`) GPTs with the same weights, built side by side and timed interleaved: {s['rounds']} rounds
of {s['per_round']} step(s) per model after {s['warmup']} warm-up steps, the order reversed every other round.
step = median over rounds; exact / float = median (p20-p80) over rounds of the ratio within a round.
Target: exact <= {TARGET}x float at the same batch (integer states move 8 B per element instead of 4).
Here: worst arch {worst:.2f}x.

{_step_table(steps)}""".strip()]
    if not gpu:
        parts.append("On a CPU the exact ops run the PyTorch reference (int64 tensor ops, several passes per "
                     "step) at small shapes; the GPU's fused integer kernels decide the target.")
    parts.append(f"""Side information of exact midpoint_a: {side_shape}, batch {sd['batch']}. For a_j = m_j/2^k_j
the forward keeps k_j bits per element per layer, packed in bit planes (a = +-1: none; eq. 3.7 draws rounded
to multiples of 1/4: 0 to 2 bits per layer). measured = bytes of the side tensors the forward left on its
autograd node; reported = the stack's `last_side_info_bytes`; formula = sum_j k_j * B*T*d/8
({'all three agree at every point' if ok else 'THEY DIFFER somewhere'}). exact saved = what the exact
reversible body saves for backward (two int64 states P[L-1], P[L] and the input, any depth); float autograd
saved = the same body, float, `reversible = False` (ordinary autograd: every block's activations, what a
non-reversible model stores), parameters excluded. Bytes.

{_side_table(sides)}""")
    return "\n\n".join(parts)


def _plot(ctx, p, steps, sides):
    fig, axes = figure(2, ctx, "Exact mode: step time vs float, side bits vs depth")
    find = {(r["arch"], r["mode"]): r for r in steps}
    ratios = [find[(a, "exact")] for a in ARCHS]
    med = [r["exact_vs_float"] for r in ratios]
    err = [[m - r["exact_vs_float_p20"] for m, r in zip(med, ratios)],
           [r["exact_vs_float_p80"] - m for m, r in zip(med, ratios)]]
    axes[0].bar(ARCHS, med, yerr=err, capsize=4, color="tab:blue")
    axes[0].axhline(TARGET, color="tab:red", ls="--", label=f"target {TARGET}x")
    axes[0].axhline(1.0, color="black", lw=0.8)
    axes[0].set_ylabel("exact / float step time (same round)")
    axes[0].set_title(f"training step, batch {p['step']['batch']} (median, p20-p80)", fontsize=10)
    axes[0].legend(fontsize=8)
    depths = p["side"]["depths"]
    unit, unit_name = (2 ** 20, "MiB") if ctx.device.type == "cuda" else (2 ** 10, "KiB")
    for label, _ in A_VALUES:
        rs = [next(r for r in sides if r["a"] == label and r["n_layers"] == L) for L in depths]
        axes[1].plot(depths, [r["side_bytes_measured"] / unit for r in rs], marker="o", label=f"a={label}")
    rs = [next(r for r in sides if r["a"] == A_VALUES[0][0] and r["n_layers"] == L) for L in depths]
    axes[1].plot(depths, [r["exact_saved_bytes"] / unit for r in rs], color="gray", ls=":",
                 label="exact saved (int64 states, input)")
    axes[1].plot(depths, [r["autograd_saved_bytes"] / unit for r in rs], color="black", ls="--",
                 label="float autograd saved (non-reversible)")
    axes[1].set_yscale("symlog", linthresh=1.0)
    axes[1].set_xlabel("n_layers")
    axes[1].set_xticks(depths)
    axes[1].set_ylabel(unit_name)
    axes[1].set_title("midpoint_a side bytes (measured) vs depth", fontsize=10)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig

