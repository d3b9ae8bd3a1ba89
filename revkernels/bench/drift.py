"""drift: how far the reversible backward strays from the exact one, per scheme, depth and block precision.

- reconstruction: run the GPT body forward with the fused ops (rev_step / coupling_step, fp32
  states), then invert it layer by layer with rev_inverse / coupling_inverse, recomputing each f
  from the rebuilt state, down to p[0] and p[-1] (q[0] and p[0] for hamiltonian). Error: max |rebuilt -
  embedding| over both, absolute and relative to max |embedding|.
- gradients: the same GPT with `body.reversible = True` against `False` (ordinary autograd of the
  same forward): max over parameters of max|g_rev - g_ref| / max|g_ref|.
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
COLUMNS = ("scheme", "n_layers", "block_dtype", "recon_abs", "recon_rel", "grad_rel", "device", "preset")
VALUES = ("recon_abs", "recon_rel", "grad_rel")


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


def gradient_error(model, idx, targets, autocast) -> float:
    """max over parameters of max|g_rev - g_ref| / max|g_ref| (parameters with zero gradient skipped)."""
    grads = {}
    for reversible in (False, True):
        model.zero_grad(set_to_none=True)
        model.body.reversible = reversible
        with autocast:
            loss = model(idx, targets)[1]
        loss.backward()
        grads[reversible] = [p.grad.detach().clone() for p in model.parameters()]
    errs = [float((g - g0).abs().max() / g0.abs().max()) for g0, g in zip(grads[False], grads[True])
            if bool(g0.abs().max() > 0)]
    return max(errs)


def measure_point(ctx, p, scheme, n_layers, dtype) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig(**p["shape"], n_layers=n_layers, arch=scheme, loss_chunk_tokens=p["loss_chunk_tokens"])
    model = GPT(cfg).to(ctx.device)
    B, T = p["batch"], cfg.seq_len
    idx = torch.randint(cfg.vocab_size, (B, T), device=ctx.device)
    targets = torch.randint(cfg.vocab_size, (B, T), device=ctx.device)
    with torch.no_grad():
        x = model.wte(idx) + model.wpe(torch.arange(T, device=ctx.device))
    roundtrip = hamiltonian_roundtrip if scheme == "hamiltonian" else three_term_roundtrip
    rebuilt = roundtrip(model.body, x, _autocast(ctx.device, dtype))
    recon_abs = max(float((r - x).abs().max()) for r in rebuilt)
    grad_rel = gradient_error(model, idx, targets, _autocast(ctx.device, dtype))
    return dict(scheme=scheme, n_layers=n_layers, block_dtype=dtype, recon_abs=recon_abs,
                recon_rel=recon_abs / float(x.abs().max()), grad_rel=grad_rel,
                device=ctx.device_name, preset=ctx.preset)


def run(ctx) -> str:
    p = PRESETS[ctx.preset]
    path = ctx.path("csv")
    done = {(r["scheme"], int(r["n_layers"]), r["block_dtype"]): dict(r, n_layers=int(r["n_layers"]),
                                                                      **{k: float(r[k]) for k in VALUES})
            for r in read_csv(path) if (r["device"], r["preset"]) == (ctx.device_name, ctx.preset)}
    points = [(s, L, dt) for dt in DTYPES for s in SCHEMES for L in p["depths"]]
    for pt in progress(points, "drift"):
        if pt not in done and ctx.selected(scheme=pt[0], n_layers=pt[1]):
            ctx.check_time(f"drift {pt}")
            done[pt] = measure_point(ctx, p, *pt)
            append_csv(path, done[pt], COLUMNS)
    rows = [done[pt] for pt in points if pt in done]
    write_csv(path, rows, COLUMNS)
    return write_report(ctx, "Reconstruction and gradient drift", _markdown(p, rows), _plot(ctx, p, rows))


def _value(rows, scheme, L, dtype, key):
    """The measured value, or NaN for a point not measured yet."""
    return next((r[key] for r in rows if (r["scheme"], r["n_layers"], r["block_dtype"]) == (scheme, L, dtype)),
                float("nan"))


def _markdown(p, rows) -> str:
    parts = []
    for key, what in (("recon_rel", "Relative reconstruction error of p[0] (max over p[0], p[-1])"),
                      ("grad_rel", "Relative gradient error against ordinary autograd")):
        for dt in DTYPES:
            table = markdown_table(["n_layers"] + list(SCHEMES),
                                   [[L] + [sci(_value(rows, s, L, dt, key)) for s in SCHEMES] for L in p["depths"]])
            parts.append(f"{what}, {dt} blocks:\n\n{table}")
    shape = ", ".join(f"{k}={v}" for k, v in p["shape"].items())
    L_max = p["depths"][-1]
    mid = _value(rows, "midpoint", L_max, "fp32", "grad_rel")
    body = "\n\n".join(parts)
    return f"""
Shape: {shape}, batch {p['batch']}; GPT init; fp32 states; `bf16` = blocks under bf16 autocast.
Every inverse divides by a (midpoint_a: |a_j| in [0.5, 1.5] drawn from eq. 3.7), so errors can grow
like prod 1/|a_j|. The paper gives no drift figures. Targets: drift measured and reported per scheme and
depth (0 in exact mode); gradients against ordinary autograd within a max relative error of 1e-4 for
midpoint at L=32 with fp32 blocks on a CPU. Here: {sci(mid)} for midpoint at L={L_max} (fp32 blocks).
"nan" marks a point not measured yet.

{body}
"""


def _plot(ctx, p, rows):
    fig, axes = figure(2, ctx, "Reversible drift vs depth (solid fp32 blocks, dashed bf16 blocks)")
    colors = dict(zip(SCHEMES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, key, title in zip(axes, ("recon_rel", "grad_rel"),
                              ("reconstruction of p[0]: max|err| / max|p[0]|",
                               "gradients: max|g_rev - g_ref| / max|g_ref|")):
        for s in SCHEMES:
            for dt, ls in zip(DTYPES, ("-", "--")):
                ax.plot(p["depths"], [_value(rows, s, L, dt, key) for L in p["depths"]], ls=ls, marker="o",
                        color=colors[s], label=f"{s} {dt}")
        ax.set_yscale("log", nonpositive="mask")
        ax.set_xlabel("n_layers")
        ax.set_ylabel("relative error")
        ax.set_xticks(p["depths"])
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8)
    return fig
