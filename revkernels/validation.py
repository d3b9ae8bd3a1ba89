"""Argument checks shared by the ops. Every check runs before any write, so a refused call leaves
all buffers untouched. Errors are ValueError (wrong value, shape, device, aliasing) or TypeError
(wrong kind or dtype) and name the offending argument."""
import numbers

import torch


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_like(ref_name, ref, **others):
    """All `others` are floating tensors with `ref`'s shape and device."""
    check_tensor(ref_name, ref)
    for name, t in others.items():
        check_tensor(name, t)
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} like {ref_name}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device}, expected {ref.device} like {ref_name}")


def check_same_dtype(ref_name, ref, **others):
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected {ref.dtype} like {ref_name}")


def check_coef(name, x, ref, nonzero=False):
    """A coefficient: a real Python number, a 0-d tensor, or a 1-d tensor of size ref.shape[-1]."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device}, expected {ref.device}")
        if x.dim() > 1 or (x.dim() == 1 and (ref.dim() == 0 or x.shape[0] != ref.shape[-1])):
            d = ref.shape[-1] if ref.dim() else 1
            raise ValueError(f"{name} must be a scalar or a per-channel tensor of size {d}, "
                             f"got shape {tuple(x.shape)}")
        if nonzero and bool((x == 0).any()):
            raise ValueError(f"{name} contains 0: the inverse divides by {name}")
    elif isinstance(x, numbers.Real) and not isinstance(x, bool):
        if nonzero and x == 0:
            raise ValueError(f"{name} = 0: the inverse divides by {name}")
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(x).__name__}")


def _byte_range(t):
    if t.numel() == 0:
        return 0, 0
    start = t.storage_offset() * t.element_size()
    span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1
    return start, start + span * t.element_size()


def overlaps(t1, t2):
    """True when the two tensors share any byte of storage (not checked while torch.compile traces:
    traced tensors have no storage; the custom ops' mutation declarations cover aliasing there)."""
    if torch.compiler.is_compiling() or t1.numel() == 0 or t2.numel() == 0:
        return False
    # Meta tensors hold no memory (every storage reports data_ptr 0): there is nothing to corrupt.
    if t1.device != t2.device or t1.device.type == "meta":
        return False
    if t1.untyped_storage().data_ptr() != t2.untyped_storage().data_ptr():
        return False
    (s1, e1), (s2, e2) = _byte_range(t1), _byte_range(t2)
    return s1 < e2 and s2 < e1


def same_view(t1, t2):
    return (t1.data_ptr() == t2.data_ptr() and t1.shape == t2.shape
            and t1.stride() == t2.stride() and t1.dtype == t2.dtype)


def check_writable(name, t):
    if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(f"{name} has internally overlapping memory (an expanded view): cannot write it")


def check_out(out, inplace_name, inplace_operand, **operands):
    """`out` may be exactly `inplace_operand` (in-place) or overlap no operand at all."""
    check_like(inplace_name, inplace_operand, out=out)
    check_same_dtype(inplace_name, inplace_operand, out=out)
    check_writable("out", out)
    if overlaps(out, inplace_operand) and not same_view(out, inplace_operand):
        raise ValueError(f"out partially overlaps {inplace_name}: pass out={inplace_name} exactly, or a separate buffer")
    for name, t in operands.items():
        if overlaps(out, t):
            raise ValueError(f"out aliases {name}; only out={inplace_name} runs in place")


def check_disjoint(written, read):
    """Each written buffer overlaps no other operand, written or read."""
    tensors = {**written, **read}
    for w, tw in written.items():
        check_writable(w, tw)
        for o, to in tensors.items():
            if o != w and overlaps(tw, to):
                raise ValueError(f"{w} aliases {o}: the buffers of this in-place op must not overlap")


def check_not_requiring_grad(**tensors):
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(f"{name} requires grad, but the fused ops are not differentiable: "
                               "call them under torch.no_grad(), or use ReversibleStack")
