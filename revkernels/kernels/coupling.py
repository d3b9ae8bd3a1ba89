"""Hamiltonian coupling update (DESIGN eqs. 2.8-2.9) and its inverse, one fused pass:

    forward:  out = alpha*x + g
    inverse:  out = (x - g) / alpha,   and, when SCALE_GRAD, gx <- alpha*gx in the same pass
"""
import triton
import triton.language as tl

from .common import load_coef, tile_offsets


@triton.jit
def coupling_kernel(
    out_ptr, x_ptr, g_ptr, gx_ptr, alpha_ptr, alpha_value, M, D,
    s_out_m, s_out_d, s_x_m, s_x_d, s_g_m, s_g_d, s_gx_m, s_gx_d,
    ALPHA_MODE: tl.constexpr, INVERSE: tl.constexpr, SCALE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: no offset overflow
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    mask = (rows < M)[:, None] & mask_d[None, :]
    alpha = load_coef(alpha_ptr, alpha_value, cols, mask_d, ALPHA_MODE)
    x = tl.load(x_ptr + tile_offsets(s_x_m, s_x_d, rows, cols), mask=mask).to(tl.float32)
    g = tl.load(g_ptr + tile_offsets(s_g_m, s_g_d, rows, cols), mask=mask).to(tl.float32)
    if INVERSE:
        res = tl.math.div_rn(x - g, alpha)
    else:
        res = alpha * x + g
    out_offs = tile_offsets(s_out_m, s_out_d, rows, cols)
    tl.store(out_ptr + out_offs, res.to(out_ptr.dtype.element_ty), mask=mask)
    if SCALE_GRAD:
        gx_offs = tile_offsets(s_gx_m, s_gx_d, rows, cols)
        gx = tl.load(gx_ptr + gx_offs, mask=mask).to(tl.float32)
        tl.store(gx_ptr + gx_offs, (alpha * gx).to(gx_ptr.dtype.element_ty), mask=mask)
