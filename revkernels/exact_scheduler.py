"""Exact mode (DESIGN section 1): the reversible backward on the int64 fixed-point grid, bit-exact.

Forward (no grad), with P[-1] = P[0] = round(x / SCALE) and blocks seeing x(P) = P * SCALE in fp32:

    three-term:   P[j+1] = P[j] + round(a_j*(P[j-1] - P[j])) + Q(c_j * f_j(x(P[j])))    a_j = m_j / 2^k_j
    Hamiltonian:  Q[l] = a*Q[l-1] + Q(G_l(x(P[l-1])));   P[l] = b*P[l-1] + Q(M_l(x(Q[l])))    a, b = +-1

Backward rebuilds each state bit for bit (integer inverse, plus the k_j side bits per element that the
rounding of a_j*(P[j-1]-P[j]) lost, stored packed in the forward), recomputes the block on exactly the
forward's input (same RNG, same autocast), and applies the float gradient math of DESIGN section 1:
gradients are those of the quantized forward with straight-through rounding (dQ(y)/dy = 1). Memory: two
int64 states and the input x (for the reconstruction meter) whatever the depth, plus sum_j k_j bits per
element (0 for a = +-1). `reversible=False` runs the same quantized forward with ordinary autograd:
states as float64 (which holds every grid value exactly), integer steps inside tiny autograd Functions.

Range: a state or update leaving the grid's range raises GridOverflowError once the forward (or
backward) finishes; meanwhile the kernels saturate such values, so no wrapped value is ever produced.
After each backward `report.last_reconstruction_error` = max|rebuilt - P[0]| / max|P[0]| over the
rebuilt initial state(s): 0.0 exactly when they equal the forward's bit for bit.
"""
from dataclasses import dataclass
from typing import List

import torch
from torch.autograd.function import once_differentiable

from . import reference_exact as ref
from .exact_ops import exact_backward_step_, exact_coupling_, exact_three_term_, new_flag, raise_flags
from .fixed_point import FRAC_BITS, SCALE, dyadic_parts, from_grid, side_bytes, to_grid
from .replay import AmbientState
from .scheduler import (StackRun, _add_, _ordered_param_grads, _refuse_second_backward, block_forward, block_graph,
                        block_vjp, checked_update, kept_bytes)


@dataclass
class ExactCoefs:
    """Per-layer coefficients of an exact three-term stack: a_j = m[j] / 2^k[j] (m int64, 0-d or per
    channel), c[j] a float applied in fp32."""
    m: List[torch.Tensor]
    k: List[int]
    c: List[float]

    @staticmethod
    def of(a: torch.Tensor, c: torch.Tensor, device) -> "ExactCoefs":
        """From the stack's a (L,) or (L, d) and c (L,); ValueError for a non-dyadic a_j (nearest value named)."""
        parts = [dyadic_parts(a[j], f"a[{j}]") for j in range(a.shape[0])]
        m = torch.stack([m for m, _ in parts]).to(device)         # one storage: 8 B per layer (and channel)
        return ExactCoefs(list(m.unbind(0)), [k for _, k in parts], [float(v) for v in c.tolist()])

    def side_info_bytes(self, numel: int) -> int:
        return sum(side_bytes(numel, k) for k in self.k)


def check_unit_coefficient(name, v):
    """Hamiltonian coefficients in exact mode: 1 or -1 (no side information)."""
    if v not in (1.0, -1.0):
        raise ValueError(f"{name} = {v!r}: exact mode supports the Hamiltonian scheme with {name} in {{1, -1}}")


def _rebuild_error(x, *rebuilt):
    """max over `rebuilt` of max|R - P0| / max|P0|, P0 = to_grid(x), as a 0-d float64 tensor (no host
    sync; the meter reads it lazily): exactly 0.0 iff each equals P0 bit for bit."""
    P0 = to_grid(x)
    if not P0.numel():
        return torch.zeros((), dtype=torch.float64, device=x.device)
    diff = torch.stack([(R - P0).abs().amax() for R in rebuilt]).amax()
    return diff.double() / P0.abs().amax().clamp_min(1).double()


def _output(P, x_dtype):
    return from_grid(P).to(x_dtype)


def _grad_buffer(grad_out):
    return grad_out.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


class ExactThreeTermFunction(torch.autograd.Function):
    """The exact three-term stack (see the module docstring); returns x(P[L]) in x's dtype."""

    @staticmethod
    def forward(ctx, x, coefs: ExactCoefs, run: StackRun, report, *params):
        ambient = AmbientState.capture(x.device)
        prev = to_grid(x)                                              # P[-1]
        cur = prev.clone()                                             # P[0]
        flag, fwds, stored_outs, sides = new_flag(x.device), [], [], []
        nbytes = (x.numel() + 7) // 8
        for j in range(len(run.blocks)):
            fwd, f = block_forward(run, j, from_grid(cur), fresh=True)
            fwds.append(fwd)
            if fwd.leaf is not None:
                stored_outs.append(f)
            k = coefs.k[j]
            side = torch.empty((k, nbytes), dtype=torch.uint8, device=x.device) if k else None
            exact_three_term_(prev, prev, cur, f.detach(), coefs.m[j], k, coefs.c[j], side, flag)   # prev <- P[j+1]
            sides.append(side)
            prev, cur = cur, prev
        raise_flags(flag, "the exact forward")
        report.last_side_info_bytes = coefs.side_info_bytes(x.numel())
        run.policy_bytes = kept_bytes(fwds)
        ctx.run, ctx.coefs, ctx.report, ctx.sides = run, coefs, report, sides
        ctx.fwds, ctx.ambient, ctx.x_dtype = fwds, ambient, x.dtype
        ctx.save_for_backward(prev, cur, x, *stored_outs)              # P[L-1], P[L], x (for the meter)
        return _output(cur, x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        _refuse_second_backward(ctx)
        prev, last, x, *stored_outs = ctx.saved_tensors
        run, coefs = ctx.run, ctx.coefs
        stored_outs = dict(zip(sorted(run.stored), stored_outs))
        A, B = last, prev                                  # P[j+1], P[j]: ours (the output is a copy)
        gA = _grad_buffer(grad_out)
        gB = torch.zeros_like(gA)
        flag, param_grads = new_flag(A.device), []
        for j in reversed(range(len(run.blocks))):
            inp, f = block_graph(run, j, from_grid(B), ctx.fwds[j], ctx.ambient, stored_outs.pop(j, None))
            gf = exact_backward_step_(A, B, f.detach(), gA, gB, coefs.m[j], coefs.k[j], coefs.c[j],
                                      ctx.sides[j], flag)     # A <- P[j-1]
            ctx.sides[j] = None
            grads_j = []
            _add_(gB, block_vjp(run, j, f, inp, gf, grads_j))
            param_grads.append(grads_j)
            A, B, gA, gB = B, A, gB, gA
        raise_flags(flag, "the exact backward")
        ctx.report._record_reconstruction(_rebuild_error(x, A, B))
        g_x = (gA + gB).to(ctx.x_dtype)                    # P[0] and P[-1] both come from x
        return (g_x, None, None, None, *_ordered_param_grads(param_grads))


class ExactHamiltonianFunction(torch.autograd.Function):
    """The exact Hamiltonian stack; run.blocks alternates G_1, M_1, G_2, ...; a, b = +-1. Returns x(P[L])."""

    @staticmethod
    def forward(ctx, x, a: int, b: int, run: StackRun, report, *params):
        ambient = AmbientState.capture(x.device)
        q = to_grid(x)
        p = q.clone()
        flag, fwds, stored_outs = new_flag(x.device), [], []
        for j in range(len(run.blocks)):      # G_l (j even): Q[l] from P[l-1]; M_l (j odd): P[l] from Q[l]
            src, dst, coef = (p, q, a) if j % 2 == 0 else (q, p, b)
            fwd, f = block_forward(run, j, from_grid(src), fresh=True)
            fwds.append(fwd)
            if fwd.leaf is not None:
                stored_outs.append(f)
            exact_coupling_(dst, dst, f.detach(), coef, flag)
        raise_flags(flag, "the exact forward")
        report.last_side_info_bytes = 0
        run.policy_bytes = kept_bytes(fwds)
        ctx.run, ctx.report, ctx.fwds, ctx.ambient, ctx.x_dtype, ctx.a, ctx.b = (
            run, report, fwds, ambient, x.dtype, a, b)
        ctx.save_for_backward(q, p, x, *stored_outs)
        return _output(p, x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        _refuse_second_backward(ctx)
        q, p, x, *stored_outs = ctx.saved_tensors
        run, a, b = ctx.run, ctx.a, ctx.b
        stored_outs = dict(zip(sorted(run.stored), stored_outs))
        gp = _grad_buffer(grad_out)
        gq = torch.zeros_like(gp)
        flag, param_grads = new_flag(p.device), []
        for l in reversed(range(0, len(run.blocks), 2)):
            grads_m, grads_g = [], []
            inp, m = block_graph(run, l + 1, from_grid(q), ctx.fwds[l + 1], ctx.ambient,
                                 stored_outs.pop(l + 1, None))
            _add_(gq, block_vjp(run, l + 1, m, inp, gp.to(m.dtype), grads_m))      # dL/dQ[l] complete
            exact_coupling_(p, p, m.detach(), b, flag, inverse=True, gx=gp)          # P[l-1], gp <- b*gp
            inp, g = block_graph(run, l, from_grid(p), ctx.fwds[l], ctx.ambient, stored_outs.pop(l, None))
            _add_(gp, block_vjp(run, l, g, inp, gq.to(g.dtype), grads_g))          # dL/dP[l-1] complete
            exact_coupling_(q, q, g.detach(), a, flag, inverse=True, gx=gq)          # Q[l-1], gq <- a*gq
            param_grads += [grads_m, grads_g]
        raise_flags(flag, "the exact backward")
        ctx.report._record_reconstruction(_rebuild_error(x, q, p))
        g_x = (gq + gp).to(ctx.x_dtype)
        return (g_x, None, None, None, None, *_ordered_param_grads(param_grads))


# ---------------------------------------------------------------- reference: ordinary autograd

def _check(flags, where):
    if flags:
        raise_flags(torch.tensor([flags], dtype=torch.int32), where)


def _grid_ints(v):
    """int64 P of a float64 grid value v = P * SCALE (exact)."""
    return (v * 2.0 ** FRAC_BITS).to(torch.int64)


def _grid_floats(P):
    return P.double() * SCALE


class _GridThreeTermStep(torch.autograd.Function):
    """x[j+1] of the quantized three-term step on float64 grid values; straight-through gradients
    (a*g, (1-a)*g, c*g)."""

    @staticmethod
    def forward(ctx, prev, cur, f, m, k, c):
        P_next, _, flags = ref.three_term_step(_grid_ints(prev), _grid_ints(cur), f.detach(), m, k, c)
        _check(flags, "the exact forward (reversible=False)")
        ctx.a, ctx.c, ctx.f_dtype = m.double() / 2 ** k, c, f.dtype
        return _grid_floats(P_next)

    @staticmethod
    def backward(ctx, g):
        return ctx.a * g, (1 - ctx.a) * g, (ctx.c * g).to(ctx.f_dtype), None, None, None


class _GridCoupling(torch.autograd.Function):
    """alpha*x + Q(g) on float64 grid values; straight-through gradients (alpha*g, g)."""

    @staticmethod
    def forward(ctx, x, g, alpha):
        out, flags = ref.coupling(_grid_ints(x), g.detach(), alpha)
        _check(flags, "the exact forward (reversible=False)")
        ctx.alpha, ctx.g_dtype = alpha, g.dtype
        return _grid_floats(out)

    @staticmethod
    def backward(ctx, gout):
        return ctx.alpha * gout, gout.to(ctx.g_dtype), None


def _to_grid_ste(x):
    """x rounded onto the grid, as float64, with a straight-through gradient."""
    x64 = x.double()
    return x64 + (_grid_floats(to_grid(x)) - x64).detach()


def _block_input(v):
    return v.float()          # = from_grid(P): one rounding of the exact value to fp32


# ---------------------------------------------------------------- entry points (layers)

def _cached_coefs(a, c, device, holder) -> ExactCoefs:
    """ExactCoefs of a, c on `device`, kept on `holder` (the stack) until a or c changes (storage or
    in-place version) or the device does: building them reads a and c on the host, one sync per layer,
    which a training step must not pay every forward."""
    key = (str(device), a.data_ptr(), a._version, c.data_ptr(), c._version)
    cached = getattr(holder, "_exact_coefs", None)
    if cached is None or cached[0] != key:
        holder._exact_coefs = cached = (key, ExactCoefs.of(a, c, device))
    return cached[1]


def exact_three_term(x, a, c, run: StackRun, reversible: bool, report):
    """p[L] of the exact three-term stack (a: (L,) or (L, d) dyadic, c: (L,)); `report` receives
    last_side_info_bytes (and last_reconstruction_error after a reversible backward)."""
    coefs = _cached_coefs(a, c, x.device, report)
    if reversible:
        return ExactThreeTermFunction.apply(x, coefs, run, report, *run.flat_params())
    prev = cur = _to_grid_ste(x)
    for j, block in enumerate(run.blocks):
        f = checked_update(block, j, _block_input(cur))
        prev, cur = cur, _GridThreeTermStep.apply(prev, cur, f, coefs.m[j], coefs.k[j], coefs.c[j])
    report.last_side_info_bytes = coefs.side_info_bytes(x.numel())
    return _block_input(cur).to(x.dtype)


def exact_hamiltonian(x, a, b, run: StackRun, reversible: bool, report):
    """p[L] of the exact Hamiltonian stack (a, b = +-1)."""
    a, b = int(a), int(b)
    if reversible:
        return ExactHamiltonianFunction.apply(x, a, b, run, report, *run.flat_params())
    q = p = _to_grid_ste(x)
    for l in range(0, len(run.blocks), 2):
        q = _GridCoupling.apply(q, checked_update(run.blocks[l], l, _block_input(p)), a)
        p = _GridCoupling.apply(p, checked_update(run.blocks[l + 1], l + 1, _block_input(q)), b)
    report.last_side_info_bytes = 0
    return _block_input(p).to(x.dtype)
