"""The three-term reversible update and its inverse (DESIGN eq. 3.6), one fused pass.

    forward:  out = a*x + (1-a)*y + c*f          (x = p[j-1], y = p[j], out = p[j+1])
    inverse:  out = (x - (1-a)*y - c*f) / a      (x = p[j+1], y = p[j], out = p[j-1])

Every operand is loaded, cast to fp32, combined, and cast to `out`'s dtype on store.
Tiling and the ALIGN / VEC conventions: see kernels.common.
"""
import triton
import triton.language as tl

from .common import load_coef, tile_index, tile_offsets


@triton.jit
def three_term_kernel(
    out_ptr, x_ptr, y_ptr, f_ptr, a_ptr, c_ptr, a_value, c_value, M, D,
    s_out_m, s_out_d, s_x_m, s_x_d, s_y_m, s_y_d, s_f_m, s_f_d,
    A_MODE: tl.constexpr, C_MODE: tl.constexpr, INVERSE: tl.constexpr,
    ALIGN: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, cols, mask_d, mask = tile_index(M, D * ALIGN, BLOCK_M, BLOCK_D, VEC)
    a = load_coef(a_ptr, a_value, cols, mask_d, A_MODE)
    c = load_coef(c_ptr, c_value, cols, mask_d, C_MODE)
    x = tl.load(x_ptr + tile_offsets(s_x_m, s_x_d, rows, cols, ALIGN), mask=mask).to(tl.float32)
    y = tl.load(y_ptr + tile_offsets(s_y_m, s_y_d, rows, cols, ALIGN), mask=mask).to(tl.float32)
    f = tl.load(f_ptr + tile_offsets(s_f_m, s_f_d, rows, cols, ALIGN), mask=mask).to(tl.float32)
    if INVERSE:
        res = tl.math.div_rn(x - (1.0 - a) * y - c * f, a)
    else:
        res = a * x + (1.0 - a) * y + c * f
    out_offs = tile_offsets(s_out_m, s_out_d, rows, cols, ALIGN)
    tl.store(out_ptr + out_offs, res.to(out_ptr.dtype.element_ty), mask=mask)
