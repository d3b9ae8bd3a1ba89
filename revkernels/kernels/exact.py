"""Exact-mode kernels: integer states on the fixed-point grid (revkernels.fixed_point), one fused pass each.
The formulas, flags and side-bit layout are those of revkernels.reference_exact (read it first):

    step:     P[j+1] = P[j] + round(a*(P[j-1]-P[j])) + Q(c*f),   side <- the k bits the rounding loses
    inverse:  P[j-1] = P[j] + ((P[j+1] - P[j] - Q(c*f)) << k + r - h) / m
    backward: the inverse in place on A, and gf = c*gA, gB += (1-a)*gA, gA = a*gA   (fp32)
    coupling: out = alpha*X + Q(g), or (X - Q(g))*alpha                         (alpha = +-1)

States are contiguous int64 tensors seen flat (N elements, D channels); f, gradients contiguous too.
a = m/2^K with m an int64 scalar or per-channel tensor. Each program ORs its flags into flag_ptr[0]
(one atomic per program, only when set). Out-of-range states are saturated, so nothing ever wraps.
"""
import triton
import triton.language as tl

STATE_LIMIT = tl.constexpr(2 ** 52)
Q_LIMIT = tl.constexpr(float(2 ** 52))
TWO_POW_FRAC = tl.constexpr(4294967296.0)   # 2^32: fixed_point.FRAC_BITS


@triton.jit
def _quantize(f, c):
    """(Q(c*f) int64, ok): y = c*f in fp32, Q = floor(y*2^32 + 0.5) in float64; bad entries give 0."""
    y = (c * f).to(tl.float64) * TWO_POW_FRAC
    ok = tl.abs(y) <= Q_LIMIT
    return tl.floor(tl.where(ok, y, 0.0) + 0.5).to(tl.int64), ok


@triton.jit
def _saturate(P):
    ok = tl.abs(P) <= STATE_LIMIT
    return tl.minimum(tl.maximum(P, -STATE_LIMIT - 1), STATE_LIMIT + 1), ok


@triton.jit
def _report(flag_ptr, mask, range_ok, update_ok, exact_ok):
    bad_range = tl.max(tl.where(mask & (range_ok == 0), 1, 0), axis=0)
    bad_update = tl.max(tl.where(mask & (update_ok == 0), 1, 0), axis=0)
    bad_exact = tl.max(tl.where(mask & (exact_ok == 0), 1, 0), axis=0)
    flags = bad_range + 2 * bad_update + 4 * bad_exact
    tl.atomic_or(flag_ptr, flags, mask=flags != 0)


@triton.jit
def _load_m(m_ptr, offs, mask, D, M_PER_CHANNEL: tl.constexpr):
    if M_PER_CHANNEL:
        return tl.load(m_ptr + offs % D, mask=mask, other=1)
    else:
        return tl.load(m_ptr)


@triton.jit
def _pack_side(side_ptr, r, pid, NB, K: tl.constexpr, BLOCK: tl.constexpr):
    """Stores the K low bits of r (one tile) as K bit planes of BLOCK/8 bytes each."""
    byte_idx = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    shifts = tl.arange(0, 8)
    for b in tl.static_range(K):
        bits = tl.reshape(((r >> b) & 1).to(tl.int32), (BLOCK // 8, 8))
        byte = tl.sum(bits << shifts[None, :], axis=1)
        tl.store(side_ptr + b * NB + byte_idx, byte.to(tl.uint8), mask=byte_idx < NB)


@triton.jit
def _unpack_side(side_ptr, pid, NB, K: tl.constexpr, BLOCK: tl.constexpr):
    byte_idx = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    shifts = tl.arange(0, 8)
    r = tl.zeros((BLOCK,), dtype=tl.int64)
    for b in tl.static_range(K):
        byte = tl.load(side_ptr + b * NB + byte_idx, mask=byte_idx < NB, other=0).to(tl.int32)
        bits = tl.reshape((byte[:, None] >> shifts[None, :]) & 1, (BLOCK,))
        r += bits.to(tl.int64) << b
    return r


@triton.jit
def _load_three_term(x_ptr, y_ptr, f_ptr, m_ptr, c, N, D, M_PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile of a three-term op: (pid, offs, mask, m, x, y, Q(c*f), update_ok)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    m = _load_m(m_ptr, offs, mask, D, M_PER_CHANNEL)
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    y = tl.load(y_ptr + offs, mask=mask, other=0)
    q, update_ok = _quantize(tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32), c)
    return pid, offs, mask, m, x, y, q, update_ok


@triton.jit
def _inverse(x, y, q, m, side_ptr, pid, NB, K: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """(P[j-1], exact_ok) from x = P[j+1], y = P[j], q = Q(c*f)."""
    S = (x - y - q) << K
    if K > 0:
        S += _unpack_side(side_ptr, pid, NB, K, BLOCK) - HALF
    delta = S // m
    return y + delta, delta * m == S


@triton.jit
def exact_three_term_kernel(
    out_ptr, x_ptr, y_ptr, f_ptr, m_ptr, side_ptr, flag_ptr, c, N, D, NB,
    M_PER_CHANNEL: tl.constexpr, K: tl.constexpr, HALF: tl.constexpr, INVERSE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """step: out = P[j+1] from x = P[j-1], y = P[j] (writes side bits); inverse: out = P[j-1] from x = P[j+1]."""
    pid, offs, mask, m, x, y, q, update_ok = _load_three_term(x_ptr, y_ptr, f_ptr, m_ptr, c, N, D,
                                                              M_PER_CHANNEL, BLOCK)
    if INVERSE:
        res, exact_ok = _inverse(x, y, q, m, side_ptr, pid, NB, K, HALF, BLOCK)
    else:
        S = m * (x - y)
        T = (S + HALF) >> K
        if K > 0:
            _pack_side(side_ptr, tl.where(mask, S + HALF - (T << K), 0), pid, NB, K, BLOCK)
        res = y + T + q
        exact_ok = mask
    res, range_ok = _saturate(res)
    tl.store(out_ptr + offs, res, mask=mask)
    _report(flag_ptr, mask, range_ok, update_ok, exact_ok)


@triton.jit
def exact_backward_step_kernel(
    A_ptr, B_ptr, f_ptr, gA_ptr, gB_ptr, gf_ptr, m_ptr, side_ptr, flag_ptr, c, N, D, NB,
    M_PER_CHANNEL: tl.constexpr, K: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
):
    """A <- P[j-1] (bit-exact inverse, A = P[j+1], B = P[j]); gf = c*gA; gB += (1-a)*gA; gA <- a*gA."""
    pid, offs, mask, m, A, B, q, update_ok = _load_three_term(A_ptr, B_ptr, f_ptr, m_ptr, c, N, D,
                                                              M_PER_CHANNEL, BLOCK)
    res, exact_ok = _inverse(A, B, q, m, side_ptr, pid, NB, K, HALF, BLOCK)
    res, range_ok = _saturate(res)
    tl.store(A_ptr + offs, res, mask=mask)

    a = m.to(tl.float32) * (1.0 / (1 << K))     # exact: |m| <= 512, a power-of-2 scale
    gA = tl.load(gA_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gB = tl.load(gB_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gf_ptr + offs, (c * gA).to(gf_ptr.dtype.element_ty), mask=mask)
    tl.store(gB_ptr + offs, (gB + (1.0 - a) * gA).to(gB_ptr.dtype.element_ty), mask=mask)
    tl.store(gA_ptr + offs, (a * gA).to(gA_ptr.dtype.element_ty), mask=mask)
    _report(flag_ptr, mask, range_ok, update_ok, exact_ok)


@triton.jit
def exact_coupling_kernel(
    out_ptr, x_ptr, g_ptr, gx_ptr, flag_ptr, N,
    ALPHA: tl.constexpr, INVERSE: tl.constexpr, SCALE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = ALPHA*X + Q(g), or (X - Q(g))*ALPHA when INVERSE (and gx <- ALPHA*gx when SCALE_GRAD)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    q, update_ok = _quantize(tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32), 1.0)
    if INVERSE:
        res = (x - q) * ALPHA
    else:
        res = x * ALPHA + q
    res, range_ok = _saturate(res)
    tl.store(out_ptr + offs, res, mask=mask)
    if SCALE_GRAD:
        gx = tl.load(gx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gx_ptr + offs, (gx * ALPHA).to(gx_ptr.dtype.element_ty), mask=mask)
    _report(flag_ptr, mask, range_ok, update_ok, mask)
