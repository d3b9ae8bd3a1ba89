"""Shared test set-up: kernels on CPU via Triton's interpreter, NaN-filled fresh buffers, devices."""
import os

# Must precede the first `import triton` (revkernels reads it at import). `make test` sets it to 0 on a
# CUDA machine so the kernels run compiled there; on CPU the interpreter runs the same kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Each test taking `device` runs on the CPU, and on CUDA when there is one."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _nan_filled(alloc):
    """Wrap an allocator so that its floating results start as NaN instead of stale memory: a kernel
    that reads an element of a fresh buffer it never wrote then yields NaN and the test fails
    (flash-linear-attention's conftest does the same). Integer, bool and complex results are left alone.
    """
    @functools.wraps(alloc)
    def wrapper(*args, **kwargs):
        t = alloc(*args, **kwargs)
        if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.layout == torch.strided
                and t.numel() > 0):
            # no_grad: a fresh leaf with requires_grad=True refuses in-place ops under grad mode.
            # Inference tensors are only writable in inference mode, where no_grad is harmless.
            with torch.no_grad():
                t.fill_(float("nan"))
        return t
    return wrapper


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """torch.empty / empty_like / empty_strided / Tensor.new_empty return NaN-filled floats in tests.

    The patch replaces the Python-level names, so it reaches every Python caller (revkernels' launchers
    and custom-op bodies included), not allocations made inside C++ kernels.
    """
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _nan_filled(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", _nan_filled(torch.Tensor.new_empty))
