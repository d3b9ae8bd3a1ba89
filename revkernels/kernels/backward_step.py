"""Fused backward step of one three-term layer (DESIGN section 1), in one pass. With
g = gA + g_pending when PENDING (the block input gradient J^T gf of the layer above, not yet added),
else g = gA:

    A  <- (A - (1-a)*B - c*f) / a        # p[j+1] -> p[j-1], in place
    gf  = c * g                          # cotangent for the block's vjp (stored in f's dtype)
    gB <- gB + (1-a) * g
    gA <- a * g                          # partial dL/dp[j-1], in place
    da_part[tile_row, d] = sum_rows g * (A_new - B)     (when COEF_GRADS)
    dc_part[tile_row, d] = sum_rows g * f

The partial column sums are reduced on the host (to a scalar or per channel). The tile's warps lie
along D only (the launcher's configs), so the column sums stay within threads: no shared memory.
Tiling and the ALIGN / VEC conventions: see kernels.common.
"""
import triton
import triton.language as tl

from .common import load_coef, tile_index, tile_offsets


@triton.jit
def backward_step_kernel(
    A_ptr, B_ptr, f_ptr, gA_ptr, gB_ptr, gp_ptr, gf_ptr, da_ptr, dc_ptr,
    a_ptr, c_ptr, a_value, c_value, M, D,
    s_A_m, s_A_d, s_B_m, s_B_d, s_f_m, s_f_d, s_gA_m, s_gA_d, s_gB_m, s_gB_d, s_gp_m, s_gp_d,
    s_gf_m, s_gf_d,
    A_MODE: tl.constexpr, C_MODE: tl.constexpr, COEF_GRADS: tl.constexpr, PENDING: tl.constexpr,
    ALIGN: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    D = D * ALIGN
    rows, cols, mask_d, mask = tile_index(M, D, BLOCK_M, BLOCK_D, VEC)
    a = load_coef(a_ptr, a_value, cols, mask_d, A_MODE)
    c = load_coef(c_ptr, c_value, cols, mask_d, C_MODE)

    A_offs = tile_offsets(s_A_m, s_A_d, rows, cols, ALIGN)
    gA_offs = tile_offsets(s_gA_m, s_gA_d, rows, cols, ALIGN)
    gB_offs = tile_offsets(s_gB_m, s_gB_d, rows, cols, ALIGN)
    A = tl.load(A_ptr + A_offs, mask=mask).to(tl.float32)
    B = tl.load(B_ptr + tile_offsets(s_B_m, s_B_d, rows, cols, ALIGN), mask=mask).to(tl.float32)
    f = tl.load(f_ptr + tile_offsets(s_f_m, s_f_d, rows, cols, ALIGN), mask=mask).to(tl.float32)
    g = tl.load(gA_ptr + gA_offs, mask=mask, other=0.0).to(tl.float32)
    if PENDING:
        gp_offs = tile_offsets(s_gp_m, s_gp_d, rows, cols, ALIGN)
        g = g + tl.load(gp_ptr + gp_offs, mask=mask, other=0.0).to(tl.float32)
    gB = tl.load(gB_ptr + gB_offs, mask=mask).to(tl.float32)

    A_new = tl.math.div_rn(A - (1.0 - a) * B - c * f, a)
    tl.store(A_ptr + A_offs, A_new.to(A_ptr.dtype.element_ty), mask=mask)
    gf_offs = tile_offsets(s_gf_m, s_gf_d, rows, cols, ALIGN)
    tl.store(gf_ptr + gf_offs, (c * g).to(gf_ptr.dtype.element_ty), mask=mask)
    tl.store(gB_ptr + gB_offs, (gB + (1.0 - a) * g).to(gB_ptr.dtype.element_ty), mask=mask)
    tl.store(gA_ptr + gA_offs, (a * g).to(gA_ptr.dtype.element_ty), mask=mask)

    if COEF_GRADS:
        part = tl.program_id(0) * D + cols
        da = tl.sum(tl.where(mask, g * (A_new - B), 0.0), axis=0)
        dc = tl.sum(tl.where(mask, g * f, 0.0), axis=0)
        tl.store(da_ptr + part, da, mask=mask_d)
        tl.store(dc_ptr + part, dc, mask=mask_d)
