"""Plain-PyTorch formulas of every fused op: ground truth for tests and the CPU fallback.

All arithmetic is done in fp32 (or the state dtype, if wider) and cast back on store, as the
kernels do. Coefficients ``a``, ``c`` are Python floats or tensors broadcast on the last dim.
"""
import torch


def _compute_dtype(*tensors):
    return torch.promote_types(torch.float32, tensors[0].dtype)


def _coef(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) else x


def rev_step(p_prev, p_cur, f, a, c):
    """p_next = a*p_prev + (1-a)*p_cur + c*f   (DESIGN eq. 3.6)."""
    dt = _compute_dtype(p_prev)
    a, c = _coef(a, dt), _coef(c, dt)
    return (a * p_prev.to(dt) + (1 - a) * p_cur.to(dt) + c * f.to(dt)).to(p_prev.dtype)


def rev_inverse(p_next, p_cur, f, a, c):
    """p_prev = (p_next - (1-a)*p_cur - c*f) / a   (exact inverse of rev_step)."""
    dt = _compute_dtype(p_next)
    a, c = _coef(a, dt), _coef(c, dt)
    return ((p_next.to(dt) - (1 - a) * p_cur.to(dt) - c * f.to(dt)) / a).to(p_next.dtype)


def reduce_to_coef(x, coef):
    """Sum x over every dim but the last when coef is per channel, over all dims otherwise."""
    if isinstance(coef, torch.Tensor) and coef.dim() == 1:
        return x.reshape(-1, x.shape[-1]).sum(0)
    return x.sum()


def rev_backward_step(A, B, f, gA, gB, a, c, coef_grads=False, g_pending=None):
    """One layer of the reversible backward (DESIGN section 1), out of place. With
    g = gA + g_pending (summed in the compute dtype) when g_pending is given, else g = gA:

    Returns (A_new, gA_new, gB_new, gf, da, dc) with
        A_new  = (A - (1-a)*B - c*f) / a        # p[j-1]
        gf     = c * g                          # cotangent for f's vjp (f's dtype)
        gB_new = gB + (1-a) * g
        gA_new = a * g
        da     = sum(g * (A_new - B)),  dc = sum(g * f)   (None unless coef_grads)
    """
    dt = _compute_dtype(A)
    a_, c_ = _coef(a, dt), _coef(c, dt)
    g = gA.to(dt) if g_pending is None else gA.to(dt) + g_pending.to(dt)
    f32 = f.to(dt)
    A_new = (A.to(dt) - (1 - a_) * B.to(dt) - c_ * f32) / a_
    gf = (c_ * g).to(f.dtype)
    gB_new = (gB.to(dt) + (1 - a_) * g).to(gB.dtype)
    gA_new = (a_ * g).to(gA.dtype)
    da = dc = None
    if coef_grads:
        da = reduce_to_coef(g * (A_new - B.to(dt)), a)
        dc = reduce_to_coef(g * f32, c)
    return A_new.to(A.dtype), gA_new, gB_new, gf, da, dc


def coupling_step(x, g, alpha):
    """x_new = alpha*x + g   (Hamiltonian coupling, DESIGN eqs. 2.8-2.9)."""
    dt = _compute_dtype(x)
    alpha = _coef(alpha, dt)
    return (alpha * x.to(dt) + g.to(dt)).to(x.dtype)


def coupling_inverse(x_new, g, alpha):
    """x = (x_new - g) / alpha   (exact inverse of coupling_step)."""
    dt = _compute_dtype(x_new)
    alpha = _coef(alpha, dt)
    return ((x_new.to(dt) - g.to(dt)) / alpha).to(x_new.dtype)
