"""drift: how far the reversible backward strays from the exact one, per scheme, depth and block precision.

- reconstruction: run the GPT body forward with the fused ops (rev_step / coupling_step, fp32
  states), then invert it layer by layer with rev_inverse / coupling_inverse, recomputing each f
  from the rebuilt state, down to p[0] and p[-1] (q[0] and p[0] for hamiltonian). Error: max |rebuilt -
  embedding| over both, absolute and relative to max |embedding|.
- gradients: the same GPT with `body.reversible = True` against `False` (ordinary autograd of the
  same forward): max over parameters of max|g_rev - g_ref| / max|g_ref|.
- meter: the stack's own `last_reconstruction_error` after that reversible backward (the same
  quantity as the reconstruction error, measured by the scheduler on the states it rebuilt).
- exact mode: the same GPT with `GPTConfig(exact=True)` (int64 fixed-point states; midpoint_a's eq. 3.7
  draws rounded to multiples of 1/4): its meter after the reversible backward (0.0 when every state is
  rebuilt bit for bit), its gradients against the exact model with `reversible = False` (ordinary
  autograd of the same quantized forward), and the side-information bytes it stored.
- bf16 noise (bf16 rows): ordinary autograd under bf16 autocast against ordinary autograd in fp32, the
  gradient error bf16 blocks bring by themselves (FlashAttention's yardstick for low-precision paths).
  Exact mode's states are bit-exact, yet its bf16 gradients differ from its reference's at about this
  level: the two backwards round differently before the bf16 vjps (the reversible one keeps fp32
  gradient buffers, the reference float64 ones, as its states are float64).
Blocks run in fp32, or under bf16 autocast ('bf16'; states stay fp32). Models use GPT init.
Each point is appended to the CSV as it finishes; a rerun (or the next GPU plan chunk) resumes.
"""
import torch

from ..models import GPT, GPTConfig
from ..ops import coupling_inverse, coupling_step, rev_inverse, rev_step
from .common import append_csv, figure, markdown_table, progress, read_csv, sci, write_csv, write_report

SCHEMES = ("midpoint", "leapfrog", "midpoint_a", "hamiltonian")
DTYPES = ("fp32", "bf16")
PRESETS = {
    "gpu": dict(shape=dict(vocab_size=50304, seq_len=1024, d_model=768, n_heads=12), batch=2,
                depths=(8, 32, 96), loss_chunk_tokens=4096),
    "cpu": dict(shape=dict(vocab_size=256, seq_len=32, d_model=64, n_heads=4), batch=2,
                depths=(2, 4, 8, 16, 32), loss_chunk_tokens=0),
    "tiny": dict(shape=dict(vocab_size=64, seq_len=8, d_model=32, n_heads=2), batch=1,
                 depths=(1, 3), loss_chunk_tokens=0),
}
COLUMNS = ("scheme", "n_layers", "block_dtype", "recon_abs", "recon_rel", "grad_rel", "bf16_noise", "meter",
           "exact_meter", "exact_grad_rel", "exact_side_bytes", "device", "preset")
VALUES = ("recon_abs", "recon_rel", "grad_rel", "bf16_noise", "meter", "exact_meter", "exact_grad_rel")


def _autocast(device, dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


@torch.no_grad()
def three_term_roundtrip(stack, x, autocast):
    """(rebuilt p[0], rebuilt p[-1]) after the fused forward and the layer-by-layer inverse."""
    a, c = stack.a.float(), stack.c.float()
    prev, cur = x.float().clone(), x.float().clone()
    for j, block in enumerate(stack.blocks):
        with autocast:
            f = block(cur)
        prev, cur = cur, rev_step(prev, cur, f, a[j], c[j])
    A, B = cur, prev                                       # p[j+1], p[j] for j = L-1
    for j in reversed(range(len(stack.blocks))):
        with autocast:
            f = stack.blocks[j](B)
        rev_inverse(A, B, f, a[j], c[j], out=A)            # A <- p[j-1]
        A, B = B, A
    return A, B


@torch.no_grad()
def hamiltonian_roundtrip(stack, x, autocast):
    """(rebuilt q[0], rebuilt p[0]) after the fused forward and the layer-by-layer inverse."""
    q, p = x.float().clone(), x.float().clone()
    pairs = list(zip(stack.attn_blocks, stack.mlp_blocks))
    for attn, mlp in pairs:
        with autocast:
            q = coupling_step(q, attn(p), stack.a)
        with autocast:
            p = coupling_step(p, mlp(q), stack.b)
    for attn, mlp in reversed(pairs):
        with autocast:
            coupling_inverse(p, mlp(q), stack.b, out=p)
        with autocast:
            coupling_inverse(q, attn(p), stack.a, out=q)
    return q, p


def _grads(model, idx, targets, autocast, reversible) -> list:
    model.zero_grad(set_to_none=True)
    model.body.reversible = reversible
    with autocast:
        loss = model(idx, targets)[1]
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def relative_error(ref, got) -> float:
    """max over parameters of max|got - ref| / max|ref| (parameters with zero gradient skipped)."""
    return max(float((g - g0).abs().max() / g0.abs().max()) for g0, g in zip(ref, got) if bool(g0.abs().max() > 0))


def gradient_error(model, idx, targets, autocast) -> tuple:
    """(relative_error of the reversible backward's gradients against ordinary autograd's (reversible=False),
    the stack's meter `last_reconstruction_error` after the reversible backward, autograd's gradients)."""
    ref = _grads(model, idx, targets, autocast, reversible=False)
    got = _grads(model, idx, targets, autocast, reversible=True)
    return relative_error(ref, got), model.body.last_reconstruction_error, ref


def _model(ctx, p, scheme, n_layers, exact):
    torch.manual_seed(0)            # the float and the exact model get the same weights
    cfg = GPTConfig(**p["shape"], n_layers=n_layers, arch=scheme, loss_chunk_tokens=p["loss_chunk_tokens"],
                    exact=exact)
    return cfg, GPT(cfg).to(ctx.device)


def _models(ctx, p, scheme, n_layers, cache) -> dict:
    """The float and exact models of (scheme, n_layers) and the batch, built once for both block dtypes
    (nothing here trains them); `cache` keeps the last ones."""
    if cache.get("key") != (scheme, n_layers):
        cache.clear()
        cfg, model = _model(ctx, p, scheme, n_layers, exact=False)
        B, T = p["batch"], cfg.seq_len
        idx = torch.randint(cfg.vocab_size, (B, T), device=ctx.device)
        targets = torch.randint(cfg.vocab_size, (B, T), device=ctx.device)
        cache.update(key=(scheme, n_layers), model=model, idx=idx, targets=targets,
                     exact=_model(ctx, p, scheme, n_layers, exact=True)[1])
    return cache


def measure_point(ctx, p, scheme, n_layers, dtype, cache=None) -> dict:
    m = _models(ctx, p, scheme, n_layers, {} if cache is None else cache)
    model, exact, idx, targets = m["model"], m["exact"], m["idx"], m["targets"]
    T = idx.shape[1]
    with torch.no_grad():
        x = model.wte(idx) + model.wpe(torch.arange(T, device=ctx.device))
    roundtrip = hamiltonian_roundtrip if scheme == "hamiltonian" else three_term_roundtrip
    rebuilt = roundtrip(model.body, x, _autocast(ctx.device, dtype))
    recon_abs = max(float((r - x).abs().max()) for r in rebuilt)
    grad_rel, meter, ref = gradient_error(model, idx, targets, _autocast(ctx.device, dtype))
    # bf16's own gradient noise: ordinary autograd under bf16 autocast against the same in fp32
    bf16_noise = (relative_error(_grads(model, idx, targets, _autocast(ctx.device, "fp32"), False), ref)
                  if dtype == "bf16" else float("nan"))
    exact_grad_rel, exact_meter, _ = gradient_error(exact, idx, targets, _autocast(ctx.device, dtype))
    return dict(scheme=scheme, n_layers=n_layers, block_dtype=dtype, recon_abs=recon_abs,
                recon_rel=recon_abs / float(x.abs().max()), grad_rel=grad_rel, bf16_noise=bf16_noise, meter=meter,
                exact_meter=exact_meter, exact_grad_rel=exact_grad_rel,
                exact_side_bytes=exact.body.last_side_info_bytes, device=ctx.device_name, preset=ctx.preset)


def _complete(row) -> bool:
    """Whether a CSV row has every column (rows of an older CSV lack the meter and exact ones)."""
    return all(row.get(k) not in (None, "") for k in COLUMNS)


def _load(path, ctx) -> dict:
    """Finished points of this device and preset. A CSV written before the meter and exact columns is
    rewritten with the current header (its old rows with those cells empty) and its rows count as to do."""
    rows = read_csv(path)
    if rows and set(COLUMNS) - set(rows[0]):
        write_csv(path, rows, COLUMNS)
    return {(r["scheme"], int(r["n_layers"]), r["block_dtype"]): dict(
                r, n_layers=int(r["n_layers"]), exact_side_bytes=int(r["exact_side_bytes"]),
                **{k: float(r[k]) for k in VALUES})
            for r in rows if (r["device"], r["preset"]) == (ctx.device_name, ctx.preset) and _complete(r)}


def run(ctx) -> str:
    p = PRESETS[ctx.preset]
    path = ctx.path("csv")
    done = _load(path, ctx)
    points = [(s, L, dt) for dt in DTYPES for s in SCHEMES for L in p["depths"]]
    cache = {}
    for pt in progress(sorted(points, key=lambda pt: (SCHEMES.index(pt[0]), pt[1], pt[2])), "drift"):
        if pt not in done and ctx.selected(scheme=pt[0], n_layers=pt[1]):
            ctx.check_time(f"drift {pt}")
            done[pt] = measure_point(ctx, p, *pt, cache=cache)
            append_csv(path, done[pt], COLUMNS)
    rows = [done[pt] for pt in points if pt in done]
    write_csv(path, rows, COLUMNS)
    return write_report(ctx, "Reconstruction and gradient drift", _markdown(p, rows), _plot(ctx, p, rows))


def _value(rows, scheme, L, dtype, key):
    """The measured value, or NaN for a point not measured yet."""
    return next((r[key] for r in rows if (r["scheme"], r["n_layers"], r["block_dtype"]) == (scheme, L, dtype)),
                float("nan"))


def _exact_cell(x) -> str:
    """The exact meter as measured: '0' only when it is exactly 0.0."""
    return "nan" if x != x else ("0" if x == 0.0 else sci(x))


def _table(p, rows, dt, key, fmt=sci):
    return markdown_table(["n_layers"] + list(SCHEMES),
                          [[L] + [fmt(_value(rows, s, L, dt, key)) for s in SCHEMES] for L in p["depths"]])


def _cells(p, rows, dt, keys):
    """Cells 'a / b [/ c]' of several columns side by side."""
    return markdown_table(["n_layers"] + list(SCHEMES),
                          [[L] + [" / ".join(sci(_value(rows, s, L, dt, k)) for k in keys) for s in SCHEMES]
                           for L in p["depths"]])


def _exact_verdict(rows) -> str:
    if not rows:
        return "not measured yet"
    bad = [f"{r['scheme']} L={r['n_layers']} {r['block_dtype']}" for r in rows if r["exact_meter"] != 0.0]
    return "NOT 0.0 at " + ", ".join(bad) if bad else "0.0 at every measured point"


def _markdown(p, rows) -> str:
    parts = []
    for dt in DTYPES:
        parts.append(f"Relative reconstruction error of p[0] (max over p[0], p[-1]), {dt} blocks: this benchmark's "
                     f"layer-by-layer round trip / the stack's meter `last_reconstruction_error` after the "
                     f"reversible backward of the training step:\n\n{_cells(p, rows, dt, ('recon_rel', 'meter'))}")
    parts.append(f"Relative gradient error against ordinary autograd, fp32 blocks: float / exact mode "
                 f"(exact: against the exact model with `reversible=False`):\n\n"
                 f"{_cells(p, rows, 'fp32', ('grad_rel', 'exact_grad_rel'))}")
    parts.append(f"Relative gradient error against ordinary autograd, bf16 blocks: float / exact mode / bf16 noise "
                 f"(ordinary autograd under bf16 autocast against the same in fp32):\n\n"
                 f"{_cells(p, rows, 'bf16', ('grad_rel', 'exact_grad_rel', 'bf16_noise'))}")
    for dt in DTYPES:
        parts.append(f"Exact mode (`GPTConfig(exact=True)`), {dt} blocks: the meter `last_reconstruction_error` "
                     f"after the reversible backward (0 = every state rebuilt bit for bit):\n\n"
                     f"{_table(p, rows, dt, 'exact_meter', _exact_cell)}")
    side = markdown_table(["n_layers", "midpoint_a side bytes (exact)"],
                          [[L, f"{_value(rows, 'midpoint_a', L, 'fp32', 'exact_side_bytes'):.0f}"]
                           for L in p["depths"]])
    shape = ", ".join(f"{k}={v}" for k, v in p["shape"].items())
    L_max = p["depths"][-1]
    mid = _value(rows, "midpoint", L_max, "fp32", "grad_rel")
    body = "\n\n".join(parts)
    return f"""
Shape: {shape}, batch {p['batch']}; GPT init; fp32 states; `bf16` = blocks under bf16 autocast.
Every inverse divides by a (midpoint_a: |a_j| in [0.5, 1.5] drawn from eq. 3.7), so errors can grow
like prod 1/|a_j|. The paper gives no drift figures. Targets: drift measured and reported per scheme and
depth (0 in exact mode); gradients against ordinary autograd within a max relative error of 1e-4 for
midpoint at L=32 with fp32 blocks on a CPU. Here: {sci(mid)} for midpoint at L={L_max} (fp32 blocks);
exact mode's meter: {_exact_verdict(rows)}.
Exact mode: int64 states with 32 fractional bits; midpoint_a's draws rounded to multiples of 1/4, so its
a_j (and its gradients) differ from the float model's; every exact gradient is compared with the exact
model's own `reversible=False` (straight-through rounding): what remains is rounding in the backward
(fp32 summation order; with bf16 blocks, bf16 vjps on the reversible path's fp32 gradient buffers against
the reference's float64 ones), hence the bf16 noise column beside it.
"nan" marks a point not measured yet.

{body}

Side information stored by exact midpoint_a (k_j bits per element per layer for a_j = m/2^k_j; 0 for
the other schemes):

{side}
"""


def _plot(ctx, p, rows):
    fig, axes = figure(3, ctx, "Reversible drift vs depth (solid fp32 blocks, dashed bf16 blocks)")
    colors = dict(zip(SCHEMES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    panels = (("recon_rel", "reconstruction of p[0]: max|err| / max|p[0]|\n(x: the stack's meter)"),
              ("grad_rel", "float gradients: max|g_rev - g_ref| / max|g_ref|"),
              ("exact_grad_rel", "exact mode gradients vs exact reversible=False (meter: 0.0)\n"
                                "dotted: bf16 noise, bf16 vs fp32 autograd"))
    for ax, (key, title) in zip(axes, panels):
        for s in SCHEMES:
            for dt, ls in zip(DTYPES, ("-", "--")):
                ax.plot(p["depths"], [_value(rows, s, L, dt, key) for L in p["depths"]], ls=ls, marker="o",
                        color=colors[s], label=f"{s} {dt}")
                if key == "recon_rel":
                    ax.plot(p["depths"], [_value(rows, s, L, dt, "meter") for L in p["depths"]], ls="none",
                            marker="x", markersize=8, color=colors[s])
            if key == "exact_grad_rel":
                ax.plot(p["depths"], [_value(rows, s, L, "bf16", "bf16_noise") for L in p["depths"]], ls=":",
                        color=colors[s])
        ax.set_yscale("log", nonpositive="mask")
        ax.set_xlabel("n_layers")
        ax.set_ylabel("relative error")
        ax.set_xticks(p["depths"])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8)
    return fig
