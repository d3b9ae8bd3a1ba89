"""Hamiltonian coupling update (DESIGN eqs. 2.8-2.9) and its inverse, one fused pass:

    forward:  out = alpha*x + g
    inverse:  out = (x - g) / alpha,   and, when SCALE_GRAD, gx <- alpha*gx in the same pass

Tiling and the ALIGN / VEC conventions: see kernels.common.
"""
import triton
import triton.language as tl

from .common import load_coef, tile_index, tile_offsets


@triton.jit
def coupling_kernel(
    out_ptr, x_ptr, g_ptr, gx_ptr, alpha_ptr, alpha_value, M, D,
    s_out_m, s_out_d, s_x_m, s_x_d, s_g_m, s_g_d, s_gx_m, s_gx_d,
    ALPHA_MODE: tl.constexpr, INVERSE: tl.constexpr, SCALE_GRAD: tl.constexpr,
    ALIGN: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, mask_d, mask = tile_index(M, D * ALIGN, BLOCK_M, BLOCK_D, VEC)
    alpha = load_coef(alpha_ptr, alpha_value, cols, mask_d, ALPHA_MODE)
    x = tl.load(x_ptr + tile_offsets(s_x_m, s_x_d, rows, cols, ALIGN), mask=mask).to(tl.float32)
    g = tl.load(g_ptr + tile_offsets(s_g_m, s_g_d, rows, cols, ALIGN), mask=mask).to(tl.float32)
    if INVERSE:
        res = tl.math.div_rn(x - g, alpha)
    else:
        res = alpha * x + g
    out_offs = tile_offsets(s_out_m, s_out_d, rows, cols, ALIGN)
    tl.store(out_ptr + out_offs, res.to(out_ptr.dtype.element_ty), mask=mask)
    if SCALE_GRAD:
        gx_offs = tile_offsets(s_gx_m, s_gx_d, rows, cols, ALIGN)
        gx = tl.load(gx_ptr + gx_offs, mask=mask).to(tl.float32)
        tl.store(gx_ptr + gx_offs, (alpha * gx).to(gx_ptr.dtype.element_ty), mask=mask)
