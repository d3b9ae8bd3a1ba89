"""Shared device helpers for the elementwise kernels over a (M, D) view of the tensors."""
import triton
import triton.language as tl


@triton.jit
def tile_offsets(stride_m, stride_d, rows, cols):
    """Element offsets of a (BLOCK_M, BLOCK_D) tile of a strided (M, D) tensor."""
    return rows[:, None] * stride_m + cols[None, :] * stride_d


@triton.jit
def load_coef(ptr, value, cols, mask_d, MODE: tl.constexpr):
    """A coefficient as fp32, broadcastable to a tile: MODE 0 = Python float `value`,
    1 = 0-d tensor at `ptr`, 2 = per-channel tensor of size D at `ptr` (loaded at `cols`)."""
    if MODE == 0:
        return value
    elif MODE == 1:
        return tl.load(ptr).to(tl.float32)
    else:
        return tl.load(ptr + cols, mask=mask_d, other=1.0).to(tl.float32)[None, :]
