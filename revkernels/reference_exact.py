"""Exact-mode formulas in plain PyTorch: ground truth for the kernels of kernels/exact.py and the CPU
fallback. States are int64 on the grid of revkernels.fixed_point; `m` (int64, 0-d or per channel) and
`k` give a = m / 2^k; `c` is a float (applied in fp32). Every function also returns `flags`, an int:
FLAG_RANGE (a state left |P| <= STATE_LIMIT; saturated to +-(STATE_LIMIT+1) so nothing wraps),
FLAG_UPDATE (c*f non-finite or beyond the range; its Q taken as 0), FLAG_INEXACT (an inverse whose
division by m left a remainder: the update differs from the forward's).

Three-term step (eq. 3.6 on the grid), with D = P[j-1] - P[j], S = m*D, h = 2^(k-1) (0 when k = 0):

    T = (S + h) >> k                     # round(a * D), half up
    r = S + h - (T << k)                 # the k bits the rounding loses, in [0, 2^k): side information
    P[j+1] = P[j] + T + Q(c*f)           # = round(a*P[j-1] + (1-a)*P[j]) + Q(c*f)

Inverse: T = P[j+1] - P[j] - Q(c*f);  S = (T << k) + r - h;  P[j-1] = P[j] + S / m  (exact division).
Side bits are packed as k bit planes of ceil(n/8) uint8 bytes (element e is bit e % 8 of byte e // 8).
"""
import torch

from .fixed_point import FRAC_BITS, RANGE, STATE_LIMIT

FLAG_RANGE, FLAG_UPDATE, FLAG_INEXACT = 1, 2, 4


def _all_within(x, limit):
    """Every |x| <= limit (False if any is NaN): one min/max pass instead of a mask."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(lo >= -limit) and bool(hi <= limit)


def quantize(f, c):
    """(Q(c*f) as int64, bad): y = c*f in fp32, Q(y) = floor(y*2^32 + 0.5); bad (a bool) when an entry is
    non-finite or |y| > 2^20, and those entries give 0."""
    y = f.float() if c == 1.0 else torch.tensor(c, dtype=torch.float32, device=f.device) * f.float()
    bad = not _all_within(y, RANGE)
    if bad:
        y = torch.where(y.abs() <= RANGE, y, 0.0)
    y = y.double()                  # exact; then * 2^32 (exact) + 0.5 and floor, in place
    return y.mul_(2.0 ** FRAC_BITS).add_(0.5).floor_().to(torch.int64), bad


def _saturate(P):
    """(P with |P| > STATE_LIMIT saturated to +-(STATE_LIMIT + 1), whether any was)."""
    if _all_within(P, STATE_LIMIT):
        return P, False
    return P.clamp(-STATE_LIMIT - 1, STATE_LIMIT + 1), True


def _is_one(m):
    """m is a 0-d 1 (a = 2^-k): the products and divisions by m can be skipped."""
    return m.dim() == 0 and int(m) == 1


def _flags(range_bad: bool, update_bad: bool, inexact: bool = False):
    return FLAG_RANGE * range_bad + FLAG_UPDATE * update_bad + FLAG_INEXACT * inexact


def pack_side(r, k):
    """k bit planes of r (int64, values in [0, 2^k)) as uint8 of shape (k, ceil(n/8)), all planes at once
    (in uint8: r < 2^k <= 2^8)."""
    flat = r.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = (flat.view(1, -1, 8) >> torch.arange(k, device=r.device, dtype=torch.uint8).view(k, 1, 1)) & 1
    out = bits[:, :, 0].clone()
    for e in range(1, 8):                        # element e of each group of 8 is bit e of the byte
        out |= bits[:, :, e] << e
    return out


def unpack_side(side, k, shape):
    """The inverse of pack_side: int64 values in [0, 2^k) of `shape`."""
    n = 1
    for s in shape:
        n *= s
    bits = (side[:, :, None] >> torch.arange(8, device=side.device, dtype=torch.uint8)) & 1    # (k, bytes, 8)
    r = bits[0].clone()
    for plane in range(1, k):
        r |= bits[plane] << plane
    return r.reshape(-1)[:n].view(shape).to(torch.int64)


def three_term_step(P_prev, P_cur, f, m, k, c):
    """(P_next, side or None, flags): P[j+1] = P[j] + round(a*(P[j-1]-P[j])) + Q(c*f). With Sh = S + h,
    T = Sh >> k and the side bits r = Sh - (T << k) = Sh & (2^k - 1) (two's complement, floor shift)."""
    h = (1 << (k - 1)) if k else 0
    q, update_bad = quantize(f, c)
    Sh = P_prev - P_cur if _is_one(m) else m * (P_prev - P_cur)
    if h:
        Sh += h
    side = pack_side(Sh & ((1 << k) - 1), k) if k else None
    P_next, range_bad = _saturate((Sh >> k).add_(P_cur).add_(q))
    return P_next, side, _flags(range_bad, update_bad)


def three_term_inverse(P_next, P_cur, f, m, k, c, side):
    """(P_prev, flags): the exact inverse of three_term_step given its side bits."""
    h = (1 << (k - 1)) if k else 0
    q, update_bad = quantize(f, c)
    S = (P_next - P_cur).sub_(q)
    if k:
        S = S.bitwise_left_shift_(k).add_(unpack_side(side, k, P_next.shape))
    if h:
        S -= h
    if _is_one(m):                       # division by 1: exact
        P_prev, range_bad = _saturate(S.add_(P_cur))
        return P_prev, _flags(range_bad, update_bad)
    delta = torch.div(S, m, rounding_mode="trunc")
    P_prev, range_bad = _saturate(P_cur + delta)
    return P_prev, _flags(range_bad, update_bad, bool((delta * m != S).any()))


def backward_step(A, B, f, gA, gB, m, k, c, side):
    """One layer of the exact reversible backward, out of place:

        A_new = three_term_inverse(A, B, f)     # p[j-1], bit-exact
        gf = c*gA (f's dtype);  gB_new = gB + (1-a)*gA;  gA_new = a*gA     (fp32, a = m/2^k)
    Returns (A_new, gA_new, gB_new, gf, flags)."""
    A_new, flags = three_term_inverse(A, B, f, m, k, c, side)
    a = m.to(torch.float32) / 2 ** k
    g = gA.float()
    gf = (torch.tensor(c, dtype=torch.float32, device=g.device) * g).to(f.dtype)
    return A_new, (a * g).to(gA.dtype), (gB.float() + (1 - a) * g).to(gB.dtype), gf, flags


def coupling(X, g, alpha, inverse=False):
    """(out, flags): out = alpha*X + Q(g), or (X - Q(g)) * alpha when inverse (alpha in {1, -1})."""
    q, update_bad = quantize(g, 1.0)
    out, range_bad = _saturate((X - q) * alpha if inverse else alpha * X + q)
    return out, _flags(range_bad, update_bad)
