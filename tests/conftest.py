"""Shared test set-up: kernels on CPU via Triton's interpreter, NaN-filled fresh buffers, devices."""
import os

import torch  # torch does not import triton

# Must precede the first `import triton` (revkernels reads it at import): compiled kernels on a CUDA
# machine, Triton's interpreter running the same kernels on CPU tensors otherwise.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
# On a GPU each launch then compiles one tile per specialisation instead of timing every candidate
# (correctness does not depend on the tile; test_autotuning_applies_in_place_updates_once tunes).
os.environ.setdefault("REVKERNELS_AUTOTUNE", "0")

import functools  # noqa: E402

import pytest  # noqa: E402

# The tests run tiny tensors: intra-op threads gain nothing there, and OpenMP's spin-waits thrash on
# a shared 2-core machine (a 32x64 @ 64x192 linear measured 24 ms with 2 threads under load, 44 us with 1).
torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Modules that test the fused ops' CPU path without the interpreter (revkernels.fallback) as well override
# `device` with these params; on a CUDA machine the interpreter is off and `cpu` is that path already.
FALLBACK = "cpu-fallback"
DEVICES_AND_FALLBACK = DEVICES + ([FALLBACK] if os.environ["TRITON_INTERPRET"] == "1" else [])


def select_device(param, monkeypatch):
    """The device of fixture param `param` for the duration of a test.

    On CUDA, fp32 matmuls are pinned to IEEE fp32 (no TF32) for the test, whatever an earlier test or
    import set: the fp32 tolerances are rounding bounds in eps32 = 1.2e-7, which TF32's 10-bit
    mantissa (eps 1e-3) would exceed by four orders of magnitude. FALLBACK is the CPU with the fused
    ops routed to revkernels.fallback instead of the interpreter."""
    if param == FALLBACK:
        from revkernels import ops
        monkeypatch.setattr(ops, "INTERPRET", False)
        yield torch.device("cpu")
        return
    if param != "cuda":
        yield torch.device(param)
        return
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield torch.device("cuda")
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """Each test taking `device` runs on the CPU, and on CUDA when there is one (see select_device)."""
    yield from select_device(request.param, monkeypatch)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- NaN-filled allocations

def _nan_filled(alloc):
    """Wrap an allocator so that its floating results start as NaN instead of stale memory: a kernel
    that reads an element of a fresh buffer it never wrote then yields NaN and the test fails
    (flash-linear-attention's conftest does the same). Integer, bool, complex and sparse results are
    left alone; inside a torch.compile'd graph nothing is filled (the graph's own semantics hold)."""
    @functools.wraps(alloc)
    def wrapper(*args, **kwargs):
        t = alloc(*args, **kwargs)
        if torch.compiler.is_compiling():
            return t
        if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.layout == torch.strided
                and t.numel() > 0):
            # no_grad: a fresh leaf with requires_grad=True refuses in-place ops under grad mode.
            # Inference tensors are only writable in inference mode, where no_grad is harmless.
            with torch.no_grad():
                t.fill_(float("nan"))
        return t
    return wrapper


_TORCH_ALLOCATORS = ("empty", "empty_like", "empty_strided")
# Created once, so every test patches in the same objects.
_NAN_TORCH = {name: _nan_filled(getattr(torch, name)) for name in _TORCH_ALLOCATORS}
_NAN_NEW_EMPTY = _nan_filled(torch.Tensor.new_empty)

# torch.compile (Dynamo) caches, on first use, which objects *are* torch.empty & co. If that first use
# happened inside a test, it would record the wrappers, and the real functions (restored after the
# test, or reached through a wrapper) would become untraceable. Build those caches from the real
# functions now; the wrappers are then ordinary Python functions that Dynamo inlines.
try:
    from torch._dynamo import trace_rules as _trace_rules

    _trace_rules.get_torch_obj_rule_map()
    _trace_rules.get_tensor_method()
except Exception:  # a private API: without it only compile tests can suffer, not the guard
    pass


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """torch.empty / empty_like / empty_strided / Tensor.new_empty return NaN-filled floats in tests.

    The patch replaces the Python-level names, so it reaches every Python caller (revkernels' launchers
    and custom-op bodies included), not allocations made inside C++ kernels.
    """
    for name, wrapper in _NAN_TORCH.items():
        monkeypatch.setattr(torch, name, wrapper)
    monkeypatch.setattr(torch.Tensor, "new_empty", _NAN_NEW_EMPTY)


@pytest.fixture
def fallback_ops(monkeypatch):
    """The fused ops (float and exact) on the CPU through revkernels.fallback / reference_exact, the
    bit-identical PyTorch formulas, instead of Triton's interpreter, for tests whose subject is a model,
    an adapter or a cache rather than the kernels (test_ops.py and test_exact.py hold those to the
    interpreter): ~10x faster on a 30-layer checkpoint."""
    from revkernels import ops
    monkeypatch.setattr(ops, "INTERPRET", False)


# ---------------------------------------------------------------- the real checkpoint

@pytest.fixture(scope="session")
def smollm2():
    """(teacher, tokenizer): SmolLM2-135M-Instruct, fp32, eval, loaded once per test run (~25 s on 2
    cores). Tests must not modify the teacher (retrofit copies it)."""
    from revkernels.bench.smollm2 import load_smollm2
    model, tokenizer = load_smollm2()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
