"""Shared device helpers for the elementwise kernels over a (M, D) view of the tensors.

A program owns a tile of BLOCK_M rows x BLOCK_D channels, held as (BLOCK_M, BLOCK_D // VEC, VEC): the
last dim of VEC channels is what one thread reads with one vector access (VEC = 16 bytes over the
widest operand, e.g. 4 for fp32 states). Its size caps the contiguity the compiler sees at VEC, so every
operand, a bf16 `f` as well as the fp32 states, gets the same per-thread layout: a 64-bit bf16 load
next to a 128-bit fp32 load, and no layout conversion through shared memory (bar.sync) before the
fp32 stores. (A flat (BLOCK_M, BLOCK_D) tile lets a bf16 load take 8 channels per thread against 4 for
fp32 stores, and the cast then goes through shared memory.)

D and the row strides arrive divided by ALIGN (a power of two <= 16 dividing D and every row stride,
checked by the launcher): multiplying by the constexpr ALIGN tells the compiler each row starts on an
ALIGN-channel boundary, so rows of e.g. 100 channels still get vector accesses.
"""
import triton
import triton.language as tl


@triton.jit
def tile_index(M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr):
    """(rows (BLOCK_M,), cols (BLOCK_D//VEC, VEC), mask_d of cols, mask of the 3-d tile) of this program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: no offset overflow
    cols = tl.reshape(tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D), (BLOCK_D // VEC, VEC))
    mask_d = cols < D
    mask = (rows < M)[:, None, None] & mask_d[None, :, :]
    return rows, cols, mask_d, mask


@triton.jit
def tile_offsets(stride_m, stride_d, rows, cols, ALIGN: tl.constexpr):
    """Element offsets of a tile of a strided (M, D) tensor; `stride_m` arrives divided by ALIGN."""
    return rows[:, None, None] * (stride_m * ALIGN) + cols[None, :, :] * stride_d


@triton.jit
def load_coef(ptr, value, cols, mask_d, MODE: tl.constexpr):
    """A coefficient as fp32, broadcastable to a tile: MODE 0 = Python float `value`,
    1 = 0-d tensor at `ptr`, 2 = per-channel fp32 tensor of size D at `ptr` (loaded at `cols`)."""
    if MODE == 0:
        return value
    elif MODE == 1:
        return tl.load(ptr).to(tl.float32)
    else:
        return tl.load(ptr + cols, mask=mask_d, other=1.0).to(tl.float32)[None, :, :]
