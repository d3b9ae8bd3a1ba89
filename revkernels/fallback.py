"""The fused ops on tensors the Triton kernels do not take (a CPU without the interpreter, float64
states): the formulas of ``revkernels.reference`` written in place, so each op makes a few passes over
its buffers and allocates nothing the size of a state beyond its outputs (the coefficient gradients,
when asked for, take temporaries as the reference does).

The same equations as the kernels (DESIGN section 1), computed in the state dtype (fp32 or float64):

    three_term_  out <- a*x + (1-a)*y + c*f,   or (x - (1-a)*y - c*f)/a when inverse
    backward_    g = gA (+ g_pending);  A <- (A - (1-a)*B - c*f)/a;  gf = c*g;  gB <- gB + (1-a)*g;  gA <- a*g
    coupling_    out <- alpha*x + g,     or (x - g)/alpha when inverse;  gx <- alpha*gx

Rounding: one rounding per product and per sum, like the reference, except that PyTorch may fuse a
product into the following sum (one rounding fewer); tests/test_ops.py holds this path to the same
per-implementation bounds as the kernels. States narrower than fp32 (whose arithmetic is fp32 with one
rounding on store) go through the reference itself.

`out` is either exactly `x` or overlaps no operand (ops.py validates that before calling here).
"""
import torch
from torch import Tensor

from . import reference as ref
from .validation import same_view


def _in_place_ok(state: Tensor) -> bool:
    """Whether the state's own dtype is the compute dtype (fp32 or wider), so in-place updates round as
    the reference does."""
    return torch.promote_types(torch.float32, state.dtype) == state.dtype


def _start_from(out: Tensor, x: Tensor) -> Tensor:
    if not same_view(out, x):
        out.copy_(x)
    return out


def _coef(v, like: Tensor):
    """A coefficient in the state's dtype: a Python float, or a tensor broadcast on the last dim."""
    return v.to(like.dtype) if isinstance(v, Tensor) else v


def _add_scaled_(out: Tensor, t: Tensor, coef, sign: float = 1.0) -> Tensor:
    """out += sign * coef * t (t read in out's dtype)."""
    if isinstance(coef, Tensor):
        return out.addcmul_(t, coef, value=sign)
    return out.add_(t, alpha=sign * coef)


def three_term_(out, x, y, f, a, c, inverse):
    """out <- a*x + (1-a)*y + c*f, or (x - (1-a)*y - c*f)/a when inverse."""
    if not _in_place_ok(out):
        out.copy_((ref.rev_inverse if inverse else ref.rev_step)(x, y, f, a, c))
        return
    a, c = _coef(a, out), _coef(c, out)
    _start_from(out, x)
    if inverse:
        _add_scaled_(_add_scaled_(out, y, 1 - a, -1.0), f, c, -1.0).div_(a)
    else:
        _add_scaled_(_add_scaled_(out.mul_(a), y, 1 - a), f, c)


def backward_step_(A, B, f, gA, gB, g_pending, a, c, coef_grads):
    """The reversible backward step in place on A, gA, gB; returns (gf, da, dc), da and dc None unless
    coef_grads (sums over every dim but the last for per-channel coefficients, over all otherwise)."""
    if not _in_place_ok(A) or not _in_place_ok(gA):
        A_new, gA_new, gB_new, gf, da, dc = ref.rev_backward_step(A, B, f, gA, gB, a, c, coef_grads, g_pending)
        A.copy_(A_new), gA.copy_(gA_new), gB.copy_(gB_new)
        return gf, da, dc
    a, c = _coef(a, A), _coef(c, A)
    g = gA if g_pending is None else gA.add_(g_pending)                 # gA's buffer holds g until its update
    _add_scaled_(_add_scaled_(A, B, 1 - a, -1.0), f, c, -1.0).div_(a)   # A <- p[j-1]
    gf = torch.mul(g, c, out=torch.empty(f.shape, dtype=f.dtype, device=f.device))   # contiguous, as the kernel's
    _add_scaled_(gB, g, 1 - a)
    da = dc = None
    if coef_grads:
        da = ref.reduce_to_coef(g * (A - B), a)
        dc = ref.reduce_to_coef(g * f.to(g.dtype), c)
    gA.mul_(a)
    return gf, da, dc


def coupling_(out, x, g, gx, alpha, inverse):
    """out <- alpha*x + g, or (x - g)/alpha when inverse; gx <- alpha*gx when gx is given."""
    if not _in_place_ok(out):
        out.copy_((ref.coupling_inverse if inverse else ref.coupling_step)(x, g, alpha))
    else:
        a = _coef(alpha, out)
        _start_from(out, x)
        if inverse:
            out.sub_(g).div_(a)
        else:
            out.mul_(a).add_(g)
    if gx is not None:
        if _in_place_ok(gx):
            gx.mul_(_coef(alpha, gx))
        else:
            gx.copy_((gx.float() * (alpha.float() if isinstance(alpha, Tensor) else alpha)).to(gx.dtype))
