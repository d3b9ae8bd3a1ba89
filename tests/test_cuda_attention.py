"""bf16 agreement of the reversible GPT on CUDA, with attention through SDPA's FlashAttention kernel and,
when the package is importable, through flash-attn (revkernels.attention dispatches to flash-attn for
CUDA fp16/bf16 tensors whenever `flash_attn_func` is importable, to SDPA otherwise).

FlashAttention's rule (DESIGN 5), per tensor: |rev16 - ref32| <= 2 |ref16 - ref32| + atol, with
  ref32: the same model in fp32 with ordinary autograd (reversible=False), no autocast, no TF32;
  ref16: reversible=False under torch.autocast("cuda", bfloat16), same attention backend as rev16;
  rev16: the reversible backward under the same autocast and backend.
The tensors are the loss and every parameter gradient; each error is normwise, max|got - ref32| /
max|ref32| (an elementwise one would be dominated by entries near zero). atol covers what the reversible
run adds on top of bf16 itself, the fp32 rounding of the rebuilt states: at most K eps32 L^2 with K = 2
(leapfrog's double root, tests/test_scheduler.py), 3.8e-6 at L = 4; the bf16 errors it sits beside are
~1e-3..1e-2.

CUDA only: skipped (but collected) without a GPU, so it adds nothing to CPU CI.
"""
import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import revkernels as rk
from conftest import select_device
from revkernels import attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ARCHS = ("midpoint", "leapfrog", "hamiltonian")
VOCAB, D, HEADS, L, T, B = 256, 128, 4, 4, 64, 2
EPS32 = torch.finfo(torch.float32).eps
ATOL = 2 * EPS32 * L * L
K = 2


@pytest.fixture
def cuda(monkeypatch):
    """The CUDA device with fp32 matmuls pinned to IEEE fp32 (ref32 must not be a TF32 run)."""
    yield from select_device("cuda", monkeypatch)


def model_and_batch(arch, device):
    """The model built on the CPU from a fixed seed (the same weights for every backend), moved."""
    torch.manual_seed(0)
    model = rk.GPT(rk.GPTConfig(vocab_size=VOCAB, seq_len=T, d_model=D, n_heads=HEADS, n_layers=L,
                                arch=arch)).to(device)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (B, T + 1), generator=gen).to(device)
    return model, idx[:, :-1], idx[:, 1:].contiguous()


def loss_and_grads(model, idx, targets, reversible, bf16, backend=contextlib.nullcontext):
    """{'loss', every parameter's name: its grad} of one forward + backward. The backend context
    (e.g. sdpa_kernel) spans the backward too: the reversible backward recomputes the blocks there,
    and the recompute must run the forward's attention kernel."""
    model.body.reversible = reversible
    model.zero_grad(set_to_none=True)
    with backend():
        with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(idx, targets)
        loss.backward()
    out = {"loss": loss.detach().float()}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient (reversible={reversible})"
        out[name] = p.grad.float().clone()
    return out


def rel_errors(got, ref):
    errs = {}
    for name, r in ref.items():
        g = got[name]
        assert torch.isfinite(g).all(), f"{name} is not finite"
        scale = r.abs().max().item()
        assert scale > 0, f"reference {name} is all zero: the comparison would be vacuous"
        errs[name] = (g - r).abs().max().item() / scale
    return errs


def assert_flash_rule(arch, device, backend, expected_backend):
    model, idx, targets = model_and_batch(arch, device)
    ref32 = loss_and_grads(model, idx, targets, reversible=False, bf16=False)
    ref16 = loss_and_grads(model, idx, targets, reversible=False, bf16=True, backend=backend)
    assert attention.last_attention_backend() == expected_backend
    rev16 = loss_and_grads(model, idx, targets, reversible=True, bf16=True, backend=backend)
    assert attention.last_attention_backend() == expected_backend
    err_rev, err_ref16 = rel_errors(rev16, ref32), rel_errors(ref16, ref32)
    assert max(err_ref16.values()) > 1e-3          # non-vacuous: bf16 really ran
    for name in ref32:
        assert err_rev[name] <= K * err_ref16[name] + ATOL, (
            f"{arch} {name}: |rev-ref32| {err_rev[name]:.3g} > {K}*{err_ref16[name]:.3g} + {ATOL:.2g}")


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_gpt_with_sdpa_flash_kernel(arch, cuda, monkeypatch):
    """SDPA restricted to its FlashAttention kernel (an error, not a silent fallback, if it cannot
    run); flash-attn hidden from the dispatch so that SDPA is what runs even where it is installed."""
    monkeypatch.setattr(attention, "flash_attn_func", None)
    assert_flash_rule(arch, cuda, lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION), "sdpa")


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_gpt_with_flash_attn(arch, cuda):
    pytest.importorskip("flash_attn")
    if attention.flash_attn_func is None:
        pytest.skip("flash_attn imports but flash_attn_func does not")
    assert_flash_rule(arch, cuda, contextlib.nullcontext, "flash_attn")
