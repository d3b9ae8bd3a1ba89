"""Functional fused ops: validation, device dispatch, launchers, torch.library custom ops.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run the same kernels under Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before import, otherwise the in-place PyTorch
formulas of ``revkernels.fallback``. float64 states always take the fallback (the kernels compute in fp32).

Tiles: autotuned per width, op and dtypes on a GPU, one fixed tile under the interpreter
(``revkernels.tiles``); ``tuned_config`` reports the tile an op last ran with.

Coefficients ``a``, ``c``, ``alpha``: a Python float, a 0-d tensor, or a 1-d tensor of size d
broadcast on the last dim. Arithmetic is fp32; each result is cast to its buffer's dtype on store.
The ops are not differentiable: the reversible scheduler calls them on detached buffers.
"""
import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from . import fallback
from .validation import (check_coef, check_disjoint, check_like, check_not_requiring_grad,
                         check_out, check_same_dtype)

try:
    from . import tiles
    from .tiles import INTERPRET
    HAS_TRITON = True
except ImportError:  # no triton wheel for this platform: the reference runs everywhere
    HAS_TRITON = False
    INTERPRET = False


def uses_triton(t: Tensor) -> bool:
    """Whether ops on tensors like `t` run the Triton kernels (else revkernels.fallback)."""
    if not HAS_TRITON or t.dtype == torch.float64:
        return False
    return t.is_cuda or (t.device.type == "cpu" and INTERPRET)


# ---------------------------------------------------------------- launch helpers

def _coef(x):
    """(tensor or None, python value) of a coefficient, as the custom ops take it."""
    if isinstance(x, Tensor):
        return x, 0.0
    return None, float(x)


def _kernel_coef(t: Optional[Tensor], placeholder: Tensor) -> Tensor:
    """A coefficient tensor as a kernel reads it: fp32 (what the kernels compute in; the same value
    as a cast in the kernel) and, per channel, contiguous (load_coef reads it at unit stride and with
    the fp32 states' vector width). Without a tensor, any real allocation stands in (never read)."""
    return placeholder if t is None else t.to(torch.float32).contiguous()


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


def _layout(D: int, views, coef_modes=(), fp32_outputs=False) -> dict:
    """Constexprs of kernels.common: ALIGN, the largest power of two <= 16 dividing D and every row
    stride, and VEC, the channels one 16-byte access covers for the widest operand (per-channel
    coefficients and the coefficient-gradient partial sums are fp32). FMA contraction stays on
    explicitly (Triton 3.10 turns its default off); the tests' bounds allow it."""
    align = 16
    for v in (D, *(view.stride(0) for view in views)):
        align = math.gcd(align, v)
    widest = max([v.element_size() for v in views] + ([4] if fp32_outputs or 2 in coef_modes else []))
    return dict(ALIGN=align, VEC=max(1, 16 // widest), enable_fp_fusion=True)


def _device_guard(t: Tensor):
    """Triton launches on the current CUDA device and stream: make that the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _strides(align: int, *views):
    """(row stride / ALIGN, channel stride) of each view: kernels.common's convention."""
    return [s for v in views for s in (v.stride(0) // align, v.stride(1))]


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("revkernels::three_term_", mutates_args=("out",))
def _three_term_op(out: Tensor, x: Tensor, y: Tensor, f: Tensor, a_t: Optional[Tensor], a_s: float,
                   c_t: Optional[Tensor], c_s: float, inverse: bool) -> None:
    a = a_t if a_t is not None else a_s
    c = c_t if c_t is not None else c_s
    if out.numel() == 0:
        return
    if not uses_triton(out):
        fallback.three_term_(out, x, y, f, a, c, inverse)
        return
    o = _Writable2d(out, initialised=False)
    with _device_guard(out):
        tiles.launch(*_three_term_launch(o.view, _read_2d(x), _read_2d(y), _read_2d(f), a_t, a_s, c_t, c_s, inverse))
    o.commit()


def _three_term_launch(o, x, y, f, a_t, a_s, c_t, c_s, inverse):
    """tiles.launch's arguments for three_term_kernel on (M, D) views."""
    M, D = o.shape
    layout = _layout(D, (o, x, y, f), (_mode(a_t), _mode(c_t)))
    args = [o, x, y, f, _kernel_coef(a_t, x), _kernel_coef(c_t, x), a_s, c_s,
            M, D // layout["ALIGN"], *_strides(layout["ALIGN"], o, x, y, f)]
    consts = dict(A_MODE=_mode(a_t), C_MODE=_mode(c_t), INVERSE=inverse, **layout)
    return "three_term", "rev_inverse" if inverse else "rev_step", f.dtype, M, D, args, consts


@_three_term_op.register_fake
def _(out, x, y, f, a_t, a_s, c_t, c_s, inverse):
    return None


def _coef_grad_shape(t: Optional[Tensor]):
    return (t.shape[0],) if t is not None and t.dim() == 1 else ()


@torch.library.custom_op("revkernels::backward_step_", mutates_args=("A", "gA", "gB"))
def _backward_step_op(A: Tensor, B: Tensor, f: Tensor, gA: Tensor, gB: Tensor, g_pending: Optional[Tensor],
                      a_t: Optional[Tensor], a_s: float, c_t: Optional[Tensor], c_s: float,
                      coef_grads: bool) -> tuple[Tensor, Tensor, Tensor]:
    a = a_t if a_t is not None else a_s
    c = c_t if c_t is not None else c_s
    empty = A.new_empty(0, dtype=torch.float32)
    if not uses_triton(A) or A.numel() == 0:
        gf, da, dc = fallback.backward_step_(A, B, f, gA, gB, g_pending, a, c, coef_grads)
        if not coef_grads:
            return gf, empty, empty.clone()
        return gf, da.float().reshape(_coef_grad_shape(a_t)), dc.float().reshape(_coef_grad_shape(c_t))
    wA, wgA, wgB = _Writable2d(A, True), _Writable2d(gA, True), _Writable2d(gB, True)
    gp = _read_2d(g_pending) if g_pending is not None else None
    gf = torch.empty(wA.view.shape, dtype=f.dtype, device=f.device)
    launch, parts = _backward_step_launch(wA.view, _read_2d(B), _read_2d(f), wgA.view, wgB.view, gp, gf,
                                          a_t, a_s, c_t, c_s, coef_grads)
    with _device_guard(A):
        cfg = tiles.launch(*launch)
    for w in (wA, wgA, wgB):
        w.commit()
    gf = gf.view(A.shape)
    if not coef_grads:
        return gf, empty, empty.clone()
    # Only the rows the chosen tile wrote. Reduce each partial-sum plane separately: views of one
    # tensor would alias each other, which torch.library refuses for a custom op's outputs.
    used = tiles.grid(*wA.view.shape, cfg.kwargs)[0]
    da = parts[0, :used].sum(0) if _mode(a_t) == 2 else parts[0, :used].sum()
    dc = parts[1, :used].sum(0) if _mode(c_t) == 2 else parts[1, :used].sum()
    return gf, da, dc


def _backward_step_launch(A, B, f, gA, gB, gp, gf, a_t, a_s, c_t, c_s, coef_grads):
    """(tiles.launch's arguments, partial-sum buffers) for backward_step_kernel on (M, D) views.
    The partial column sums of the coefficient gradients get room for the tile choice with the most
    row tiles; without coef_grads (and without g_pending) the kernel never touches those pointers, so
    other real allocations stand in (unlike an empty tensor's null pointer)."""
    M, D = A.shape
    views = (A, B, f, gA, gB, gp if gp is not None else B, gf)
    layout = _layout(D, views, (_mode(a_t), _mode(c_t)), fp32_outputs=coef_grads)
    if coef_grads:
        rows = tiles.max_row_tiles("backward_step", M, D, layout["VEC"], coef_grads)
        parts = torch.empty((2, rows, D), dtype=torch.float32, device=A.device)
    else:
        parts = (gf, gf)
    args = [*views, parts[0], parts[1], _kernel_coef(a_t, B), _kernel_coef(c_t, B), a_s, c_s,
            M, D // layout["ALIGN"], *_strides(layout["ALIGN"], *views)]
    consts = dict(A_MODE=_mode(a_t), C_MODE=_mode(c_t), COEF_GRADS=coef_grads, PENDING=gp is not None, **layout)
    op = "rev_backward_step+coef_grads" if coef_grads else "rev_backward_step"
    return ("backward_step", op, f.dtype, M, D, args, consts), parts


@_backward_step_op.register_fake
def _(A, B, f, gA, gB, g_pending, a_t, a_s, c_t, c_s, coef_grads):
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
        fallback.coupling_(out, x, g, gx, alpha, inverse)
        return
    o = _Writable2d(out, initialised=False)
    wgx = _Writable2d(gx, initialised=True) if gx is not None else None
    with _device_guard(out):
        tiles.launch(*_coupling_launch(o.view, _read_2d(x), _read_2d(g), wgx.view if wgx is not None else None,
                                       alpha_t, alpha_s, inverse))
    o.commit()
    if wgx is not None:
        wgx.commit()


def _coupling_launch(o, x, g, gx, alpha_t, alpha_s, inverse):
    """tiles.launch's arguments for coupling_kernel on (M, D) views (gx None: no gradient scaling)."""
    M, D = o.shape
    gxv = gx if gx is not None else x  # placeholder when absent: never read
    layout = _layout(D, (o, x, g, gxv), (_mode(alpha_t),))
    args = [o, x, g, gxv, _kernel_coef(alpha_t, x), alpha_s, M, D // layout["ALIGN"],
            *_strides(layout["ALIGN"], o, x, g, gxv)]
    consts = dict(ALPHA_MODE=_mode(alpha_t), INVERSE=inverse, SCALE_GRAD=gx is not None, **layout)
    op = "coupling_backward_step" if gx is not None else ("coupling_inverse" if inverse else "coupling_step")
    return "coupling", op, g.dtype, M, D, args, consts


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


def backward_step_(A, B, f, gA, gB, a, c, coef_grads=False, g_pending=None):
    """The fused backward step (see rev_backward_step). No validation."""
    a_t, a_s = _coef(a)
    c_t, c_s = _coef(c)
    gf, da, dc = _backward_step_op(A, B, f, gA, gB, g_pending, a_t, a_s, c_t, c_s, coef_grads)
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
                      coef_grads: bool = False, g_pending: Optional[Tensor] = None):
    """One fused pass of the reversible backward (DESIGN section 1), in place on A, gA, gB. With
    g = gA + g_pending (g_pending: a gradient of p[j+1] not yet added to gA, e.g. the block input
    gradient J^T gf of the layer above; same shape and dtype as gA, read only), else g = gA:

        A  <- (A - (1-a)*B - c*f) / a        gB <- gB + (1-a)*g        gA <- a*g
        returns gf = c*g (f's dtype) and, when coef_grads, dL/da = sum(g*(A_new - B)),
        dL/dc = sum(g*f): fp32 scalars, or per-channel vectors for per-channel coefficients;
        otherwise (gf, None, None).
    """
    check_like("A", A, B=B, f=f, gA=gA, gB=gB)
    check_same_dtype("A", A, B=B)
    read = {"B": B, "f": f}
    if g_pending is not None:
        check_like("gA", gA, g_pending=g_pending)
        check_same_dtype("gA", gA, g_pending=g_pending)
        read["g_pending"] = g_pending
    check_coef("a", a, A, nonzero=True)
    check_coef("c", c, A)
    check_disjoint({"A": A, "gA": gA, "gB": gB}, read)
    check_not_requiring_grad(A=A, B=B, f=f, gA=gA, gB=gB, g_pending=g_pending, a=a, c=c)
    return backward_step_(A, B, f, gA, gB, a, c, coef_grads, g_pending)


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


def tuned_config(op: str, D: int, dtype=torch.bfloat16) -> Optional[dict]:
    """The tile the last Triton launch of public op `op` used for width D and f / g dtype `dtype`:
    dict(BLOCK_M, BLOCK_D, num_warps, VEC, ALIGN, tuned), `tuned` False for an untimed tile (the
    interpreter's, or a GPU's first candidate under REVKERNELS_AUTOTUNE=0); None when that op never ran
    through Triton. `op` is a public op name ("rev_step", "rev_inverse", "rev_backward_step",
    "rev_backward_step+coef_grads", "coupling_step", "coupling_inverse", "coupling_backward_step")."""
    return tiles.chosen(op, D, dtype) if HAS_TRITON else None
