"""Functional fused ops: validation, device dispatch, launchers, torch.library custom ops.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run the same kernels under Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before import, otherwise the PyTorch formulas of
``revkernels.reference``. float64 states always take the reference (the kernels compute in fp32).

Coefficients ``a``, ``c``, ``alpha``: a Python float, a 0-d tensor, or a 1-d tensor of size d
broadcast on the last dim. Arithmetic is fp32; each result is cast to its buffer's dtype on store.
The ops are not differentiable: the reversible scheduler calls them on detached buffers.
"""
import contextlib
import os
from typing import Optional

import torch
from torch import Tensor

from . import reference as ref
from .validation import (check_coef, check_disjoint, check_like, check_not_requiring_grad,
                         check_out, check_same_dtype)

try:
    import triton

    from .kernels.backward_step import backward_step_kernel
    from .kernels.coupling import coupling_kernel
    from .kernels.three_term import three_term_kernel
    HAS_TRITON = True
except ImportError:  # no triton wheel for this platform: the reference runs everywhere
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Tile of BLOCK_M x BLOCK_D elements per program. BLOCK_D spans channels (coalesced loads); 256 divides
# the usual model widths (512, 768, 1024, ...) so no lanes idle on masks. The element counts are a
# heuristic (a few KiB of registers per operand per program), not yet tuned on a GPU (see README).
TILE_ELEMS = {"three_term": 4096, "coupling": 4096, "backward_step": 2048}
MAX_BLOCK_D = 256


def uses_triton(t: Tensor) -> bool:
    """Whether ops on tensors like `t` run the Triton kernels (else the PyTorch reference)."""
    if not HAS_TRITON or t.dtype == torch.float64:
        return False
    return t.is_cuda or (t.device.type == "cpu" and INTERPRET)


# ---------------------------------------------------------------- launch helpers

def _coef(x):
    """(tensor or None, python value) of a coefficient, as the custom ops take it. A per-channel
    tensor is made contiguous: load_coef reads it at unit stride."""
    if isinstance(x, Tensor):
        return x.contiguous(), 0.0
    return None, float(x)


def _mode(t: Optional[Tensor]) -> int:
    """load_coef's MODE: 0 Python float, 1 0-d tensor, 2 per-channel tensor."""
    return 0 if t is None else (1 if t.dim() == 0 else 2)


def _as_2d(t: Tensor):
    """A (M, D) view of `t` when one exists without a copy, else None."""
    d = t.shape[-1] if t.dim() else 1
    try:
        return t.view(-1, d)
    except RuntimeError:
        return None


def _read_2d(t: Tensor) -> Tensor:
    v = _as_2d(t)
    return v if v is not None else t.reshape(-1, t.shape[-1] if t.dim() else 1)


class _Writable2d:
    """A (M, D) view for a kernel to write; falls back to a contiguous copy written back on exit."""

    def __init__(self, t: Tensor, initialised: bool):
        self.t = t
        self.view = _as_2d(t)
        self.copied = self.view is None
        if self.copied:
            tmp = t.contiguous() if initialised else torch.empty_like(t, memory_format=torch.contiguous_format)
            self.view = tmp.view(-1, t.shape[-1] if t.dim() else 1)

    def commit(self):
        if self.copied:
            self.t.copy_(self.view.view(self.t.shape))


def _tiles(M: int, D: int, family: str):
    block_d = min(triton.next_power_of_2(D), MAX_BLOCK_D)
    block_m = max(1, min(TILE_ELEMS[family] // block_d, triton.next_power_of_2(M)))
    num_warps = 8 if block_m * block_d >= 4096 else 4
    grid = (triton.cdiv(M, block_m), triton.cdiv(D, block_d))
    # FMA contraction stays on explicitly (Triton 3.10 turns its default off); the tests' bounds allow it.
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps, enable_fp_fusion=True), grid


def _device_guard(t: Tensor):
    """Triton launches on the current CUDA device and stream: make that the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _strides(*views):
    return [s for v in views for s in v.stride()]


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("revkernels::three_term_", mutates_args=("out",))
def _three_term_op(out: Tensor, x: Tensor, y: Tensor, f: Tensor, a_t: Optional[Tensor], a_s: float,
                   c_t: Optional[Tensor], c_s: float, inverse: bool) -> None:
    a = a_t if a_t is not None else a_s
    c = c_t if c_t is not None else c_s
    if out.numel() == 0:
        return
    if not uses_triton(out):
        out.copy_((ref.rev_inverse if inverse else ref.rev_step)(x, y, f, a, c))
        return
    o = _Writable2d(out, initialised=False)
    xv, yv, fv = _read_2d(x), _read_2d(y), _read_2d(f)
    M, D = o.view.shape
    meta, grid = _tiles(M, D, "three_term")
    with _device_guard(out):
        three_term_kernel[grid](o.view, xv, yv, fv, a_t if a_t is not None else xv,
                                c_t if c_t is not None else xv, a_s, c_s, M, D,
                                *_strides(o.view, xv, yv, fv),
                                A_MODE=_mode(a_t), C_MODE=_mode(c_t), INVERSE=inverse, **meta)
    o.commit()


@_three_term_op.register_fake
def _(out, x, y, f, a_t, a_s, c_t, c_s, inverse):
    return None


def _coef_grad_shape(t: Optional[Tensor]):
    return (t.shape[0],) if t is not None and t.dim() == 1 else ()


@torch.library.custom_op("revkernels::backward_step_", mutates_args=("A", "gA", "gB"))
def _backward_step_op(A: Tensor, B: Tensor, f: Tensor, gA: Tensor, gB: Tensor,
                      a_t: Optional[Tensor], a_s: float, c_t: Optional[Tensor], c_s: float,
                      coef_grads: bool) -> tuple[Tensor, Tensor, Tensor]:
    a = a_t if a_t is not None else a_s
    c = c_t if c_t is not None else c_s
    empty = A.new_empty(0, dtype=torch.float32)
    if not uses_triton(A) or A.numel() == 0:
        A_new, gA_new, gB_new, gf, da, dc = ref.rev_backward_step(A, B, f, gA, gB, a, c, coef_grads)
        A.copy_(A_new), gA.copy_(gA_new), gB.copy_(gB_new)
        if not coef_grads:
            return gf, empty, empty.clone()
        return gf, da.float().reshape(_coef_grad_shape(a_t)), dc.float().reshape(_coef_grad_shape(c_t))
    wA, wgA, wgB = _Writable2d(A, True), _Writable2d(gA, True), _Writable2d(gB, True)
    Bv, fv = _read_2d(B), _read_2d(f)
    M, D = wA.view.shape
    gf = torch.empty((M, D), dtype=f.dtype, device=f.device)
    meta, grid = _tiles(M, D, "backward_step")
    # Per-tile column sums of the coefficient gradients; without them the kernel never touches
    # these pointers, so gf stands in (a real allocation, unlike an empty tensor's null pointer).
    parts = torch.empty((2, grid[0], D), dtype=torch.float32, device=A.device) if coef_grads else (gf, gf)
    with _device_guard(A):
        backward_step_kernel[grid](wA.view, Bv, fv, wgA.view, wgB.view, gf, parts[0], parts[1],
                                   a_t if a_t is not None else Bv, c_t if c_t is not None else Bv,
                                   a_s, c_s, M, D,
                                   *_strides(wA.view, Bv, fv, wgA.view, wgB.view, gf),
                                   A_MODE=_mode(a_t), C_MODE=_mode(c_t), COEF_GRADS=coef_grads, **meta)
    for w in (wA, wgA, wgB):
        w.commit()
    gf = gf.view(A.shape)
    if not coef_grads:
        return gf, empty, empty.clone()
    # Reduce each partial-sum plane separately: views of one `sums` tensor would alias each other,
    # which torch.library refuses for the outputs of a custom op (per-channel a and c).
    da = parts[0].sum(0) if _mode(a_t) == 2 else parts[0].sum()
    dc = parts[1].sum(0) if _mode(c_t) == 2 else parts[1].sum()
    return gf, da, dc


@_backward_step_op.register_fake
def _(A, B, f, gA, gB, a_t, a_s, c_t, c_s, coef_grads):
    if not coef_grads:
        return torch.empty_like(f), A.new_empty(0, dtype=torch.float32), A.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(f), A.new_empty(_coef_grad_shape(a_t), dtype=torch.float32),
            A.new_empty(_coef_grad_shape(c_t), dtype=torch.float32))


@torch.library.custom_op("revkernels::coupling_", mutates_args=("out", "gx"))
def _coupling_op(out: Tensor, x: Tensor, g: Tensor, gx: Optional[Tensor],
                 alpha_t: Optional[Tensor], alpha_s: float, inverse: bool) -> None:
    alpha = alpha_t if alpha_t is not None else alpha_s
    if out.numel() == 0:
        return
    if not uses_triton(out):
        out.copy_((ref.coupling_inverse if inverse else ref.coupling_step)(x, g, alpha))
        if gx is not None:
            dt = torch.promote_types(torch.float32, gx.dtype)  # fp32, or float64 gx's own precision
            gx.copy_((gx.to(dt) * (alpha.to(dt) if isinstance(alpha, Tensor) else alpha)).to(gx.dtype))
        return
    o = _Writable2d(out, initialised=False)
    wgx = _Writable2d(gx, initialised=True) if gx is not None else None
    xv, gv = _read_2d(x), _read_2d(g)
    gxv = wgx.view if wgx is not None else xv
    M, D = o.view.shape
    meta, grid = _tiles(M, D, "coupling")
    with _device_guard(out):
        coupling_kernel[grid](o.view, xv, gv, gxv, alpha_t if alpha_t is not None else xv, alpha_s, M, D,
                              *_strides(o.view, xv, gv, gxv),
                              ALPHA_MODE=_mode(alpha_t), INVERSE=inverse, SCALE_GRAD=gx is not None, **meta)
    o.commit()
    if wgx is not None:
        wgx.commit()


@_coupling_op.register_fake
def _(out, x, g, gx, alpha_t, alpha_s, inverse):
    return None


# ---------------------------------------------------------------- unchecked entry points (scheduler)

def three_term_(out, x, y, f, a, c, inverse=False):
    """out <- a*x + (1-a)*y + c*f, or (x - (1-a)*y - c*f)/a when inverse. No validation."""
    a_t, a_s = _coef(a)
    c_t, c_s = _coef(c)
    _three_term_op(out, x, y, f, a_t, a_s, c_t, c_s, inverse)
    return out


def backward_step_(A, B, f, gA, gB, a, c, coef_grads=False):
    """The fused backward step (see rev_backward_step). No validation."""
    a_t, a_s = _coef(a)
    c_t, c_s = _coef(c)
    gf, da, dc = _backward_step_op(A, B, f, gA, gB, a_t, a_s, c_t, c_s, coef_grads)
    return (gf, da, dc) if coef_grads else (gf, None, None)


def coupling_(out, x, g, alpha, inverse=False, gx=None):
    """out <- alpha*x + g, or (x - g)/alpha (and gx <- alpha*gx) when inverse. No validation."""
    alpha_t, alpha_s = _coef(alpha)
    _coupling_op(out, x, g, gx, alpha_t, alpha_s, inverse)
    return out


# ---------------------------------------------------------------- public API

def _checked_three_term(x_name, x, p_cur, f, a, c, out, inverse):
    check_like(x_name, x, p_cur=p_cur, f=f)
    check_same_dtype(x_name, x, p_cur=p_cur)
    check_coef("a", a, x, nonzero=inverse)
    check_coef("c", c, x)
    if out is not None:
        check_out(out, x_name, x, p_cur=p_cur, f=f)
    check_not_requiring_grad(**{x_name: x}, p_cur=p_cur, f=f, a=a, c=c, out=out)
    if out is None:
        out = torch.empty_like(x)
    return three_term_(out, x, p_cur, f, a, c, inverse)


def rev_step(p_prev: Tensor, p_cur: Tensor, f: Tensor, a, c, *, out: Optional[Tensor] = None) -> Tensor:
    """p_next = a*p_prev + (1-a)*p_cur + c*f  (DESIGN eq. 3.6). ``out=p_prev`` runs in place.

    p_prev, p_cur: states of one floating dtype; f: any floating dtype, read in fp32.
    """
    return _checked_three_term("p_prev", p_prev, p_cur, f, a, c, out, inverse=False)


def rev_inverse(p_next: Tensor, p_cur: Tensor, f: Tensor, a, c, *, out: Optional[Tensor] = None) -> Tensor:
    """p_prev = (p_next - (1-a)*p_cur - c*f) / a, the exact inverse of rev_step.
    ``out=p_next`` runs in place. ``a`` must be non-zero everywhere."""
    return _checked_three_term("p_next", p_next, p_cur, f, a, c, out, inverse=True)


def rev_backward_step(A: Tensor, B: Tensor, f: Tensor, gA: Tensor, gB: Tensor, a, c, *,
                      coef_grads: bool = False):
    """One fused pass of the reversible backward (DESIGN section 1), in place on A, gA, gB:

        A  <- (A - (1-a)*B - c*f) / a        gB <- gB + (1-a)*gA        gA <- a*gA
        returns gf = c*gA_old (f's dtype) and, when coef_grads, dL/da = sum(gA_old*(A_new - B)),
        dL/dc = sum(gA_old*f): fp32 scalars, or per-channel vectors for per-channel coefficients;
        otherwise (gf, None, None).
    """
    check_like("A", A, B=B, f=f, gA=gA, gB=gB)
    check_same_dtype("A", A, B=B)
    check_coef("a", a, A, nonzero=True)
    check_coef("c", c, A)
    check_disjoint({"A": A, "gA": gA, "gB": gB}, {"B": B, "f": f})
    check_not_requiring_grad(A=A, B=B, f=f, gA=gA, gB=gB, a=a, c=c)
    return backward_step_(A, B, f, gA, gB, a, c, coef_grads)


def coupling_step(x: Tensor, g: Tensor, alpha, *, out: Optional[Tensor] = None) -> Tensor:
    """x_new = alpha*x + g  (Hamiltonian coupling). ``out=x`` runs in place."""
    check_like("x", x, g=g)
    check_coef("alpha", alpha, x)
    if out is not None:
        check_out(out, "x", x, g=g)
    check_not_requiring_grad(x=x, g=g, alpha=alpha, out=out)
    return coupling_(out if out is not None else torch.empty_like(x), x, g, alpha)


def coupling_inverse(x_new: Tensor, g: Tensor, alpha, *, out: Optional[Tensor] = None) -> Tensor:
    """x = (x_new - g) / alpha, the exact inverse of coupling_step. ``out=x_new`` runs in place."""
    check_like("x_new", x_new, g=g)
    check_coef("alpha", alpha, x_new, nonzero=True)
    if out is not None:
        check_out(out, "x_new", x_new, g=g)
    check_not_requiring_grad(x_new=x_new, g=g, alpha=alpha, out=out)
    return coupling_(out if out is not None else torch.empty_like(x_new), x_new, g, alpha, inverse=True)


def coupling_backward_step(x: Tensor, g: Tensor, gx: Tensor, alpha) -> Tensor:
    """One fused pass of the Hamiltonian backward, in place: x <- (x - g)/alpha, gx <- alpha*gx."""
    check_like("x", x, g=g, gx=gx)
    check_coef("alpha", alpha, x, nonzero=True)
    check_disjoint({"x": x, "gx": gx}, {"g": g})
    check_not_requiring_grad(x=x, g=g, gx=gx, alpha=alpha)
    return coupling_(x, x, g, alpha, inverse=True, gx=gx)
