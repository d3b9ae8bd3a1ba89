"""Exact-mode ops: validation, launchers and torch.library custom ops for kernels/exact.py.

States are contiguous int64 tensors on the grid of revkernels.fixed_point (make them with `to_grid`);
`a` is dyadic (m / 2^k, k <= 8), `c` a float. Dispatch as in revkernels.ops: CUDA tensors run the Triton
kernels; CPU tensors run them under Triton's interpreter when TRITON_INTERPRET=1, else the formulas of
revkernels.reference_exact (bit-identical). The kernels OR flags into a 1-element int32 `flag` buffer;
`raise_flags` turns them into GridOverflowError (range) or RuntimeError (inexact inverse).

The public functions (`exact_rev_step`, ...) validate first, compute into fresh buffers, check the flags,
and only then write in place, so a refused call (bad input or overflow) leaves every buffer untouched.
The unchecked entry points (`exact_three_term_`, ...) serve the scheduler, which checks the flags once
per forward or backward (out-of-range states are saturated meanwhile, so nothing ever wraps).
"""
import contextlib
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import reference_exact as ref
from .fixed_point import STATE_LIMIT, GridOverflowError, dyadic_parts, range_message, side_bytes
from .ops import HAS_TRITON, uses_triton
from .validation import check_not_requiring_grad, overlaps, same_view

if HAS_TRITON:
    import triton

    from .kernels.exact import exact_backward_step_kernel, exact_coupling_kernel, exact_three_term_kernel

BLOCK = 1024  # elements per program (a multiple of 8: whole side-bit bytes per program)


def _grid(n):
    return (triton.cdiv(n, BLOCK),)


def _half(k):
    return (1 << (k - 1)) if k else 0


def _nb(n):
    return math.ceil(n / 8)


def _or_flag(flag, flags):
    if flags:
        flag.bitwise_or_(flags)


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("revkernels::exact_three_term_", mutates_args=("out", "side", "flag"))
def _exact_three_term_op(out: Tensor, x: Tensor, y: Tensor, f: Tensor, m: Tensor, k: int, c: float,
                         side: Optional[Tensor], flag: Tensor, inverse: bool) -> None:
    if out.numel() == 0:
        return
    if not uses_triton(out):
        if inverse:
            res, flags = ref.three_term_inverse(x, y, f, m, k, c, side)
        else:
            res, s, flags = ref.three_term_step(x, y, f, m, k, c)
            if k:
                side.copy_(s)
        out.copy_(res)
        _or_flag(flag, flags)
        return
    N = out.numel()
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        exact_three_term_kernel[_grid(N)](out, x, y, f.contiguous(), m, side if k else flag, flag, c, N,
                                          out.shape[-1], _nb(N), M_PER_CHANNEL=m.dim() == 1, K=k,
                                          HALF=_half(k), INVERSE=inverse, BLOCK=BLOCK)


@_exact_three_term_op.register_fake
def _(out, x, y, f, m, k, c, side, flag, inverse):
    return None


@torch.library.custom_op("revkernels::exact_backward_step_", mutates_args=("A", "gA", "gB", "flag"))
def _exact_backward_step_op(A: Tensor, B: Tensor, f: Tensor, gA: Tensor, gB: Tensor, m: Tensor, k: int,
                            c: float, side: Optional[Tensor], flag: Tensor) -> Tensor:
    if not uses_triton(A) or A.numel() == 0:
        A_new, gA_new, gB_new, gf, flags = ref.backward_step(A, B, f, gA, gB, m, k, c, side)
        A.copy_(A_new), gA.copy_(gA_new), gB.copy_(gB_new)
        _or_flag(flag, flags)
        return gf
    N = A.numel()
    gf = torch.empty(A.shape, dtype=f.dtype, device=f.device)
    with torch.cuda.device(A.device) if A.is_cuda else contextlib.nullcontext():
        exact_backward_step_kernel[_grid(N)](A, B, f.contiguous(), gA, gB, gf, m, side if k else flag, flag, c,
                                             N, A.shape[-1], _nb(N), M_PER_CHANNEL=m.dim() == 1, K=k,
                                             HALF=_half(k), BLOCK=BLOCK)
    return gf


@_exact_backward_step_op.register_fake
def _(A, B, f, gA, gB, m, k, c, side, flag):
    return torch.empty_like(f)


@torch.library.custom_op("revkernels::exact_coupling_", mutates_args=("out", "gx", "flag"))
def _exact_coupling_op(out: Tensor, x: Tensor, g: Tensor, gx: Optional[Tensor], alpha: int, inverse: bool,
                       flag: Tensor) -> None:
    if out.numel() == 0:
        return
    if not uses_triton(out):
        res, flags = ref.coupling(x, g, alpha, inverse)
        out.copy_(res)
        if gx is not None:
            gx.mul_(alpha)
        _or_flag(flag, flags)
        return
    N = out.numel()
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        exact_coupling_kernel[_grid(N)](out, x, g.contiguous(), gx if gx is not None else x, flag, N,
                                        ALPHA=alpha, INVERSE=inverse, SCALE_GRAD=gx is not None, BLOCK=BLOCK)


@_exact_coupling_op.register_fake
def _(out, x, g, gx, alpha, inverse, flag):
    return None



# ---------------------------------------------------------------- unchecked entry points (scheduler)

def new_flag(device) -> Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def raise_flags(flag: Tensor, where: str):
    """Raises for a set flag (one host sync): GridOverflowError for range, RuntimeError for an inexact inverse."""
    flags = int(flag.item())
    if flags & (ref.FLAG_RANGE | ref.FLAG_UPDATE):
        what = "a state" if flags & ref.FLAG_RANGE else "an update c*f (or it is not finite)"
        raise GridOverflowError(range_message(f"{what} in {where}"))
    if flags & ref.FLAG_INEXACT:
        raise RuntimeError(f"exact mode: an inverse in {where} left a remainder, so the recomputed update "
                           "differs from the forward's (non-deterministic block?)")


def exact_three_term_(out, x, y, f, m, k, c, side, flag, inverse=False):
    """out <- P[j+1] (step, writes `side`) or P[j-1] (inverse, reads it). No validation."""
    _exact_three_term_op(out, x, y, f, m, k, c, side, flag, inverse)
    return out


def exact_backward_step_(A, B, f, gA, gB, m, k, c, side, flag):
    """The fused exact backward step, in place on A, gA, gB; returns gf = c*gA. No validation."""
    return _exact_backward_step_op(A, B, f, gA, gB, m, k, c, side, flag)


def exact_coupling_(out, x, g, alpha, flag, inverse=False, gx=None):
    """out <- alpha*x + Q(g), or (x - Q(g))*alpha (and gx <- alpha*gx) when inverse. No validation."""
    _exact_coupling_op(out, x, g, gx, alpha, inverse, flag)
    return out


# ---------------------------------------------------------------- validation

def _check_state(name, t, ref_t=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 grid tensor (revkernels.fixed_point.to_grid), got dtype {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (exact ops read states flat)")
    if ref_t is not None:
        _check_same(name, t, ref_t)


def _check_same(name, t, ref_t):
    if t.shape != ref_t.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref_t.shape)}")
    if t.device != ref_t.device:
        raise ValueError(f"{name} is on {t.device}, expected {ref_t.device}")


def _check_float(name, t, ref_t, dtype=None):
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    _check_same(name, t, ref_t)


def _check_in_range(**states):
    for name, t in states.items():
        if t.numel() and not bool((t.abs() <= STATE_LIMIT).all()):
            raise GridOverflowError(range_message(f"input {name}"))


def _coef_a(a, ref_t):
    """(m, k) of a dyadic a: a float, a 0-d tensor or a per-channel tensor of size d."""
    if isinstance(a, bool) or not isinstance(a, (numbers.Real, Tensor)):
        raise TypeError(f"a must be a float or a tensor, got {type(a).__name__}")
    t = torch.as_tensor(a, dtype=torch.float64)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != ref_t.shape[-1]):
        raise ValueError(f"a must be a scalar or a per-channel tensor of size {ref_t.shape[-1]}, "
                         f"got shape {tuple(t.shape)}")
    if bool((t == 0).any()):
        raise ValueError("a contains 0: the inverse divides by a")
    m, k = dyadic_parts(t)
    return m.to(ref_t.device), k


def _coef_c(c):
    if isinstance(c, Tensor) and c.dim() == 0:
        c = c.item()
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
        raise TypeError(f"c must be a finite float, got {c!r}")
    return float(c)


def _check_side(side, k, ref_t):
    if k == 0:
        if side is not None and side.numel():
            raise ValueError("side must be None: a has k = 0 (no side information)")
        return
    expected = (k, _nb(ref_t.numel()))
    if not isinstance(side, Tensor) or side.dtype != torch.uint8 or tuple(side.shape) != expected:
        raise ValueError(f"side must be the uint8 tensor of shape {expected} written by exact_rev_step "
                         f"(a = m/2^{k} needs {side_bytes(ref_t.numel(), k)} bytes)")
    if side.device != ref_t.device:
        raise ValueError(f"side is on {side.device}, expected {ref_t.device}")


def _check_out(out, inplace_name, inplace):
    if out is not None and not same_view(out, inplace):
        raise ValueError(f"out must be None or {inplace_name} itself (in place)")


def _commit(out, result):
    if out is None:
        return result
    out.copy_(result)
    return out


# ---------------------------------------------------------------- public API

def exact_rev_step(P_prev: Tensor, P_cur: Tensor, f: Tensor, a, c, *, out: Optional[Tensor] = None):
    """(P_next, side): P[j+1] = P[j] + round(a*(P[j-1]-P[j])) + Q(c*f) on the int64 grid; side holds the
    k bits per element that the rounding loses (uint8 (k, ceil(n/8)), None when k = 0). out=P_prev: in place."""
    _check_state("P_prev", P_prev)
    _check_state("P_cur", P_cur, P_prev)
    _check_float("f", f, P_prev)
    m, k = _coef_a(a, P_prev)
    c = _coef_c(c)
    _check_out(out, "P_prev", P_prev)
    check_not_requiring_grad(f=f)
    _check_in_range(P_prev=P_prev, P_cur=P_cur)
    res, flag = torch.empty_like(P_prev), new_flag(P_prev.device)
    side = torch.empty((k, _nb(P_prev.numel())), dtype=torch.uint8, device=P_prev.device) if k else None
    exact_three_term_(res, P_prev, P_cur, f, m, k, c, side, flag)
    raise_flags(flag, "exact_rev_step")
    return _commit(out, res), side


def exact_rev_inverse(P_next: Tensor, P_cur: Tensor, f: Tensor, a, c, side: Optional[Tensor] = None, *,
                      out: Optional[Tensor] = None) -> Tensor:
    """P[j-1] from P[j+1], P[j] and the step's side bits, bit-exact. out=P_next: in place."""
    _check_state("P_next", P_next)
    _check_state("P_cur", P_cur, P_next)
    _check_float("f", f, P_next)
    m, k = _coef_a(a, P_next)
    c = _coef_c(c)
    _check_side(side, k, P_next)
    _check_out(out, "P_next", P_next)
    check_not_requiring_grad(f=f)
    _check_in_range(P_next=P_next, P_cur=P_cur)
    res, flag = torch.empty_like(P_next), new_flag(P_next.device)
    exact_three_term_(res, P_next, P_cur, f, m, k, c, side, flag, inverse=True)
    raise_flags(flag, "exact_rev_inverse")
    return _commit(out, res)


def exact_rev_backward_step(A: Tensor, B: Tensor, f: Tensor, gA: Tensor, gB: Tensor, a, c,
                            side: Optional[Tensor] = None) -> Tensor:
    """In place: A <- P[j-1] (A = P[j+1], B = P[j]), gB <- gB + (1-a)*gA, gA <- a*gA; returns gf = c*gA_old.
    gA, gB: contiguous fp32 gradient buffers (straight-through rounding)."""
    _check_state("A", A)
    _check_state("B", B, A)
    _check_float("f", f, A)
    for name, g in (("gA", gA), ("gB", gB)):
        _check_float(name, g, A, torch.float32)
        if not g.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    m, k = _coef_a(a, A)
    c = _coef_c(c)
    _check_side(side, k, A)
    written, read = {"A": A, "gA": gA, "gB": gB}, {"B": B, "f": f}
    for w, tw in written.items():
        for o, to in {**written, **read}.items():
            if o != w and overlaps(tw, to):
                raise ValueError(f"{w} aliases {o}: the buffers of this in-place op must not overlap")
    check_not_requiring_grad(f=f, gA=gA, gB=gB)
    _check_in_range(A=A, B=B)
    A2, gA2, gB2, flag = A.clone(), gA.clone(), gB.clone(), new_flag(A.device)
    gf = exact_backward_step_(A2, B, f, gA2, gB2, m, k, c, side, flag)
    raise_flags(flag, "exact_rev_backward_step")
    A.copy_(A2), gA.copy_(gA2), gB.copy_(gB2)
    return gf


def _checked_coupling(name, X, g, alpha, out, inverse):
    _check_state(name, X)
    _check_float("g", g, X)
    if isinstance(alpha, bool) or alpha not in (1, -1):
        raise ValueError(f"alpha must be 1 or -1 in exact mode, got {alpha!r}")
    _check_out(out, name, X)
    check_not_requiring_grad(g=g)
    _check_in_range(**{name: X})
    res, flag = torch.empty_like(X), new_flag(X.device)
    exact_coupling_(res, X, g, int(alpha), flag, inverse)
    raise_flags(flag, "exact_coupling_inverse" if inverse else "exact_coupling_step")
    return _commit(out, res)


def exact_coupling_step(X: Tensor, g: Tensor, alpha, *, out: Optional[Tensor] = None) -> Tensor:
    """alpha*X + Q(g) on the grid (alpha = +-1). out=X: in place."""
    return _checked_coupling("X", X, g, alpha, out, inverse=False)


def exact_coupling_inverse(X_new: Tensor, g: Tensor, alpha, *, out: Optional[Tensor] = None) -> Tensor:
    """(X_new - Q(g)) * alpha, the exact inverse of exact_coupling_step. out=X_new: in place."""
    return _checked_coupling("X_new", X_new, g, alpha, out, inverse=True)
