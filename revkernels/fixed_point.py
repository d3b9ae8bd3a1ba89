"""The fixed-point grid of exact mode (DESIGN section 1, "Exact mode").

Format: a state x is held as the int64 P = round(x / SCALE), SCALE = 2^-FRAC_BITS with FRAC_BITS = 32:

    resolution  2^-32 = 2.3e-10       (finer than fp32's ulp for every |x| >= 2^-9)
    range       |x| <= RANGE = 2^20 = 1048576, i.e. |P| <= STATE_LIMIT = 2^52

The 11 spare bits of int64 are headroom: one step's intermediates (m * (P[j-1] - P[j]) with |m| <= 512,
see kernels/exact.py) stay below 2^63, so they never wrap, and every grid value is exact in float64
(53-bit mantissa), which the reference path (`reversible=False`) uses to carry states through autograd.
A state or a rounded update Q(c*f) outside the range raises GridOverflowError; no wrapped value is used.

Rounding: Q(y) = floor(y * 2^32 + 0.5) for y = c * f computed in fp32 (round half up; the product by
2^32 and the addition of 0.5 are exact in float64, so kernels and reference agree bit for bit).

Dyadic coefficients: a = m / 2^k with k <= MAX_K = 8 and |m| <= MAX_M = 512 (|a| <= 2 at k = 8).
Eq. 3.7 draws are rounded to multiples of 2^-DRAW_BITS (1/4): a in {+-0.5, +-0.75, +-1, +-1.25, +-1.5},
so a drawn stack costs at most 2 side bits per element per layer.
"""
import math

import torch

FRAC_BITS = 32
SCALE = 2.0 ** -FRAC_BITS
RANGE = 2.0 ** 20
STATE_LIMIT = 2 ** 52
MAX_K = 8
MAX_M = 512
DRAW_BITS = 2


class GridOverflowError(OverflowError):
    """A value left the fixed-point grid's range (an overflow, refused before any wrapped value is used)."""


def range_message(what):
    return (f"exact mode overflow: {what} left the fixed-point grid's range |x| <= 2^20 = {RANGE:.0f} "
            f"(int64, {FRAC_BITS} fractional bits); nothing was written. Scale the inputs or updates down")


def to_grid(x: torch.Tensor) -> torch.Tensor:
    """P = round(x / SCALE) as int64 (round half up), contiguous whatever x's layout (the exact kernels
    read states, updates and gradients in one flat order), refusing non-finite values or |x| > RANGE."""
    if x.numel() and not bool((x.detach().abs() <= RANGE).all()):
        raise GridOverflowError(range_message("the input (non-finite, or too large)"))
    scaled = x.detach().to(torch.float64, memory_format=torch.contiguous_format) * 2.0 ** FRAC_BITS
    return torch.floor(scaled + 0.5).to(torch.int64)


def from_grid(P: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """x(P) = P * SCALE in `dtype` (what the blocks see): one rounding of P, then an exact power-of-2 scale."""
    return P.to(dtype) * SCALE


def dyadic_parts(a: torch.Tensor, name: str = "a"):
    """(m, k) with a = m / 2^k elementwise for the smallest common k <= MAX_K; m int64 like `a`.

    Raises ValueError naming the nearest allowed value when an entry of `a` is not of that form."""
    a64 = a.detach().double().cpu()
    for k in range(MAX_K + 1):
        scaled = a64 * 2 ** k
        if bool((scaled == scaled.round()).all()):
            m = scaled.to(torch.int64)
            if bool((m.abs() > MAX_M).any()):
                bad = a64.flatten()[(m.abs() > MAX_M).flatten()][0].item()
                raise ValueError(f"{name} = {bad} is too large for exact mode: a = m/2^k needs |m| <= {MAX_M} "
                                 f"(so the step's integer arithmetic cannot overflow int64)")
            return m.to(a.device), k
    scaled = a64 * 2 ** MAX_K
    bad = a64.flatten()[(scaled != scaled.round()).flatten()][0].item()
    nearest = round(bad * 2 ** MAX_K) / 2 ** MAX_K
    raise ValueError(f"{name} = {bad!r} is not dyadic (m/2^k with k <= {MAX_K}), which exact mode needs; "
                     f"the nearest allowed value is {nearest!r}")


def round_to_dyadic(a: torch.Tensor, bits: int = DRAW_BITS) -> torch.Tensor:
    """a rounded to the nearest multiple of 2^-bits (how exact mode takes eq. 3.7 draws); never 0."""
    r = torch.round(a.double() * 2 ** bits) / 2 ** bits
    r = torch.where(r == 0, torch.sign(a.double()) * 2.0 ** -bits, r)
    return r.to(a.dtype)


def side_bytes(numel: int, k: int) -> int:
    """Bytes of one layer's packed side information: k bit planes of ceil(numel / 8) bytes."""
    return k * math.ceil(numel / 8)
