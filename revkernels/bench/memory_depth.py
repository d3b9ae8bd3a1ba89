"""memory-depth: training-step memory against depth for every GPT arch at a fixed batch (paper Fig. 3).

GPU: peak of torch.cuda.max_memory_allocated over forward + backward + AdamW (bf16 autocast), one
fresh process per point; activation memory = peak - (parameters + gradients + AdamW state).
CPU: bytes saved for backward by forward + loss (exact, device independent).
Every arch uses the same loss_chunk_tokens, so the loss costs all of them the same.
Each point is appended to the CSV as it finishes; a rerun (or the next GPU plan chunk) measures only
the points the CSV does not have.
"""
import numpy as np

from ..models import ARCHS
from ._probe import run_probe
from .common import append_csv, figure, markdown_table, mib, progress, read_csv, write_csv, write_report

PRESETS = {
    "gpu": dict(shape=dict(vocab_size=50304, seq_len=1024, d_model=768, n_heads=12), batch=8,
                depths=(16, 32, 64, 96), loss_chunk_tokens=4096, archs=ARCHS),
    "cpu": dict(shape=dict(vocab_size=256, seq_len=64, d_model=64, n_heads=4), batch=4,
                depths=(2, 4, 8, 16, 32), loss_chunk_tokens=128, archs=ARCHS),
    "tiny": dict(shape=dict(vocab_size=64, seq_len=16, d_model=32, n_heads=2), batch=2,
                 depths=(1, 2, 4), loss_chunk_tokens=16, archs=ARCHS),
}
COLUMNS = ("arch", "n_layers", "batch", "memory_bytes", "memory_kind", "state_bytes", "activation_bytes",
           "error", "device", "preset")


def measure_point(ctx, p, arch, n_layers) -> dict:
    cfg = dict(p["shape"], n_layers=n_layers, arch=arch, loss_chunk_tokens=p["loss_chunk_tokens"])
    gpu = ctx.device.type == "cuda"
    res = run_probe(dict(cfg=cfg, batch=p["batch"], device=str(ctx.device), bf16=gpu, warmup=int(gpu), steps=0),
                    gpu, ctx)
    row = dict(arch=arch, n_layers=n_layers, batch=p["batch"], memory_kind="cuda_peak" if gpu else "saved_activations",
               memory_bytes=None, state_bytes=None, activation_bytes=None, error=res["error"],
               device=ctx.device_name, preset=ctx.preset)
    if res["ok"]:                                        # else out of memory: the row says so and plots skip it
        act = res["memory_bytes"] - res["state_bytes"] if gpu else res["memory_bytes"]
        row.update(memory_bytes=res["memory_bytes"], state_bytes=res["state_bytes"], activation_bytes=act)
    return row


def slope_per_layer(rows, arch):
    """Least-squares growth of activation bytes per layer (None with fewer than two measured depths)."""
    pts = [(r["n_layers"], r["activation_bytes"]) for r in rows
           if r["arch"] == arch and r["activation_bytes"] is not None]
    if len(pts) < 2:
        return None
    x, y = np.array(pts, dtype=np.float64).T
    return float(np.polyfit(x, y, 1)[0])


def _typed(r: dict) -> dict:
    out = dict(r, n_layers=int(r["n_layers"]), batch=int(r["batch"]))
    for k in ("memory_bytes", "state_bytes", "activation_bytes"):
        out[k] = int(r[k]) if r.get(k) else None
    return out


def run(ctx, p=None) -> str:
    """`p`: the preset's settings (default PRESETS[ctx.preset]; gpu-check passes its own)."""
    p = p or PRESETS[ctx.preset]
    path = ctx.path("csv")
    done = {(r["arch"], int(r["n_layers"])): _typed(r) for r in read_csv(path)
            if (r["device"], r["preset"], r["batch"]) == (ctx.device_name, ctx.preset, str(p["batch"]))}
    points = [(arch, L) for arch in p["archs"] for L in p["depths"]]
    for arch, L in progress(points, "memory-depth"):
        if (arch, L) not in done and ctx.selected(arch=arch, n_layers=L):
            done[(arch, L)] = measure_point(ctx, p, arch, L)
            append_csv(path, done[(arch, L)], COLUMNS)
    rows = [done.get((arch, L)) or dict(arch=arch, n_layers=L, memory_bytes=None, state_bytes=None,
                                        activation_bytes=None) for arch, L in points]
    write_csv(path, [done[k] for k in points if k in done], COLUMNS)
    return write_report(ctx, "Training memory vs depth", _markdown(ctx, p, rows), _plot(ctx, p, rows))


def _row(rows, arch, L):
    return next(r for r in rows if r["arch"] == arch and r["n_layers"] == L)


def _mib_or(x, missing="OOM"):
    return missing if x is None else mib(x)


def _activation_cell(row):
    return "—" if "device" not in row else _mib_or(row["activation_bytes"])


def _ratio(rows, arch, lo, hi):
    a, b = _row(rows, arch, hi)["activation_bytes"], _row(rows, arch, lo)["activation_bytes"]
    return "—" if a is None or b is None else f"{a / b:.3f}"


def _markdown(ctx, p, rows) -> str:
    depths, lo, hi = p["depths"], p["depths"][0], p["depths"][-1]
    kind = "cuda_peak" if ctx.device.type == "cuda" else "saved_activations"
    what = ("peak CUDA memory minus parameters, gradients and AdamW state (bf16 autocast)" if kind == "cuda_peak"
            else "bytes saved for backward by forward + loss (fp32)")
    archs = p["archs"]
    table = markdown_table(["n_layers"] + list(archs),
                           [[L] + [_activation_cell(_row(rows, a, L)) for a in archs] for L in depths])
    growth = markdown_table(
        ["arch", f"L={hi} / L={lo}", "MiB per layer (fit)", f"state MiB at L={hi}"],
        [[a, _ratio(rows, a, lo, hi), _mib_or(slope_per_layer(rows, a), "—"),
          _mib_or(_row(rows, a, hi)["state_bytes"], "—")] for a in archs])
    shape = ", ".join(f"{k}={v}" for k, v in p["shape"].items())
    return f"""
Shape: {shape}, batch {p['batch']}, loss_chunk_tokens={p['loss_chunk_tokens']} for every arch.
`memory_kind` = `{kind}`: activation memory is {what}. The CSV also has the total
(`memory_bytes`) and the parameter + gradient + AdamW bytes (`state_bytes`).

Activation memory (MiB) by depth:

{table}

Growth with depth:

{growth}

Paper (Gal et al., Fig. 3): baseline memory grows linearly with depth, midpoint stays flat.
Target: the reversible archs' activation memory flat in depth, L=96 within 5% of L=16 (GPU preset);
baseline's grows linearly. "OOM" marks a point that did not fit, "—" one not measured yet.
"""


def _plot(ctx, p, rows):
    fig, (ax_act, ax_tot) = figure(2, ctx, "Training memory vs depth")
    gpu = ctx.device.type == "cuda"
    for arch, marker in zip(p["archs"], "os^vDx"):
        rs = [r for r in rows if r["arch"] == arch and r["memory_bytes"] is not None]
        style = dict(marker=marker, ls="-" if arch in ("baseline", "checkpoint") else "--", label=arch)
        ax_act.plot([r["n_layers"] for r in rs], [r["activation_bytes"] / 2 ** 20 for r in rs], **style)
        total = [(r["memory_bytes"] if gpu else r["memory_bytes"] + r["state_bytes"]) / 2 ** 20 for r in rs]
        ax_tot.plot([r["n_layers"] for r in rs], total, **style)
    ax_act.set_title("activation memory (peak - state)" if gpu else "saved activations (forward + loss)")
    ax_tot.set_title("peak CUDA memory" if gpu else "saved activations + params, grads, AdamW")
    for ax in (ax_act, ax_tot):
        ax.set_xlabel("n_layers")
        ax.set_ylabel("MiB")
        ax.set_xticks(p["depths"])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax_act.legend()
    return fig
