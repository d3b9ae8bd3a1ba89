"""The reconstruction meter (`last_reconstruction_error`, `max_reconstruction_error`, the runaway-drift
warning) and scheduler edge cases met with other libraries' blocks: an update without a graph, and the
two-stream Hamiltonian API (q0, return_both).

Devices: tests that run a backward take conftest's `device` fixture (CPU through Triton's interpreter;
CUDA with the compiled kernels when present); stacks are built on the CPU and moved with .to(device).
Checks made by a constructor alone (argument validation, the runaway-drift warning) stay CPU-only."""
import warnings

import pytest
import torch
from torch import nn

import revkernels as rk

D, HEADS = 16, 2


def blocks(n):
    torch.manual_seed(0)
    return [rk.TransformerBlock(D, HEADS) for _ in range(n)]


def test_meter_reports_small_positive_drift_for_float_leapfrog(device):
    stack = rk.ReversibleStack(blocks(32), "leapfrog", h=0.25).to(device)
    assert stack.last_reconstruction_error is None
    stack(torch.randn(2, 4, D, device=device)).sum().backward()
    err = stack.last_reconstruction_error
    # fp32 leapfrog: a double root 1 lets rounding errors grow ~L^2 eps; measured 3e-6 here (CPU).
    assert isinstance(err, float) and 0.0 < err < 1e-4, err


def test_meter_on_hamiltonian_stack(device):
    ham = rk.HamiltonianStack([rk.AttentionBlock(D, HEADS) for _ in range(8)],
                              [rk.MLPBlock(D) for _ in range(8)]).to(device)
    ham(torch.randn(2, 4, D, device=device)).sum().backward()
    assert 0.0 <= ham.last_reconstruction_error < 1e-5


@pytest.mark.parametrize("kind", ["three_term", "hamiltonian"])
def test_max_reconstruction_error_raises_in_backward(kind, device):
    if kind == "three_term":
        stack = rk.ReversibleStack(blocks(16), "leapfrog", h=0.5, max_reconstruction_error=1e-12)
    else:
        stack = rk.HamiltonianStack([rk.AttentionBlock(D, HEADS) for _ in range(4)],
                                    [rk.MLPBlock(D) for _ in range(4)], a=-1.0, max_reconstruction_error=1e-12)
    y = stack.to(device)(torch.randn(2, 4, D, device=device))
    with pytest.raises(RuntimeError, match="max_reconstruction_error"):
        y.sum().backward()


def test_max_reconstruction_error_validated():
    with pytest.raises(ValueError, match="max_reconstruction_error"):
        rk.ReversibleStack(blocks(2), max_reconstruction_error=-1.0)


def test_runaway_drift_warns_for_constant_a_half_at_depth_32():
    with pytest.warns(UserWarning, match="exact=True"):
        rk.ReversibleStack(blocks(32), "midpoint_a", h=0.1, a=0.5)      # 2^32 amplification
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rk.ReversibleStack(blocks(32), "midpoint", h=0.5)             # |a| = 1: no amplification
        rk.ReversibleStack(blocks(8), "midpoint_a", h=0.1, a=0.5)      # 2^8 = 256 < 1e3


class Zeros(nn.Module):
    """An update with no autograd graph (a block some libraries use as padding)."""

    def forward(self, p):
        return torch.zeros_like(p)


@pytest.mark.parametrize("stack_kind", ["three_term", "hamiltonian"])
def test_update_without_graph_matches_autograd(stack_kind, device):
    torch.manual_seed(0)
    if stack_kind == "three_term":
        stack = rk.ReversibleStack([rk.TransformerBlock(D, HEADS), Zeros(), rk.TransformerBlock(D, HEADS)], h=0.5)
    else:
        stack = rk.HamiltonianStack([rk.AttentionBlock(D, HEADS), Zeros()], [Zeros(), rk.MLPBlock(D)])
    stack.to(device)
    x = torch.randn(2, 4, D, device=device, requires_grad=True)
    grads = {}
    for reversible in (False, True):
        stack.reversible = reversible
        stack.zero_grad()
        x.grad = None
        stack(x).pow(2).sum().backward()
        grads[reversible] = [x.grad.clone()] + [p.grad.clone() for p in stack.parameters()]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_hamiltonian_two_initial_streams_and_both_outputs(depth, device):
    torch.manual_seed(0)
    ham = rk.HamiltonianStack([rk.AttentionBlock(D, HEADS) for _ in range(depth)],
                              [rk.MLPBlock(D) for _ in range(depth)], a=1.0, b=-1.0).to(device)
    p0 = torch.randn(2, 4, D, device=device, requires_grad=True)
    q0 = torch.randn(2, 4, D, device=device, requires_grad=True)
    w_q, w_p = torch.randn(2, 4, D, device=device), torch.randn(2, 4, D, device=device)
    results = {}
    for reversible in (False, True):
        ham.reversible = reversible
        ham.zero_grad()
        p0.grad = q0.grad = None
        qL, pL = ham(p0, q0, return_both=True)
        ((qL * w_q).sum() + (pL * w_p).sum()).backward()    # a head reading both streams
        results[reversible] = [qL.detach(), pL.detach(), p0.grad.clone(), q0.grad.clone(),
                               *[p.grad.clone() for p in ham.parameters()]]
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ham.last_reconstruction_error < 1e-5
    # q0 defaults to p0, and the default output is p[L] alone.
    ham.reversible = True
    torch.testing.assert_close(ham(p0), ham(p0, p0, return_both=True)[1], rtol=0, atol=0)


def test_hamiltonian_q0_shape_checked():
    ham = rk.HamiltonianStack([rk.AttentionBlock(D, HEADS)], [rk.MLPBlock(D)])
    with pytest.raises(ValueError, match="q0"):
        ham(torch.randn(2, 4, D), torch.randn(2, 5, D))


@pytest.mark.parametrize("arch", ["leapfrog", "hamiltonian"])
def test_gpt_config_max_reconstruction_error_reaches_the_stack(arch, device):
    cfg = rk.GPTConfig(vocab_size=32, seq_len=8, d_model=D, n_heads=HEADS, n_layers=4, arch=arch,
                       max_reconstruction_error=1e-12, **({"ham_a": -1.0} if arch == "hamiltonian" else {}))
    model = rk.GPT(cfg).to(device)
    assert model.body.max_reconstruction_error == 1e-12
    idx = torch.randint(0, 32, (2, 8)).to(device)
    with pytest.raises(RuntimeError, match="max_reconstruction_error"):
        model(idx, idx)[1].backward()
    with pytest.raises(ValueError, match="max_reconstruction_error needs a reversible arch"):
        rk.GPTConfig(arch="baseline", max_reconstruction_error=1e-3)


class UsesOutsideParameter(nn.Module):
    """An update that reads a parameter no block owns (tied across blocks, held outside the stack)."""

    def __init__(self, outside):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.outside = [outside]          # a list: not registered as this module's parameter

    def forward(self, p):
        return torch.tanh(self.lin(p) * self.outside[0])


@pytest.mark.parametrize("stack_kind", ["three_term", "hamiltonian"])
def test_parameter_from_outside_the_blocks_gets_its_gradient(stack_kind, device):
    # The recompute's graph reaches a leaf the forward did not record: the vjp accumulates into it.
    torch.manual_seed(0)
    shared = nn.Parameter(torch.randn(D).to(device))
    if stack_kind == "three_term":
        stack = rk.ReversibleStack([UsesOutsideParameter(shared) for _ in range(3)], h=0.5)
    else:
        stack = rk.HamiltonianStack([UsesOutsideParameter(shared) for _ in range(2)],
                                    [UsesOutsideParameter(shared) for _ in range(2)])
    stack = stack.to(device)
    x = torch.randn(2, 4, D).to(device).requires_grad_(True)
    grads = {}
    for reversible in (False, True):
        stack.reversible = reversible
        stack.zero_grad()
        shared.grad = x.grad = None
        stack(x).pow(2).sum().backward()
        grads[reversible] = [x.grad.clone(), shared.grad.clone()] + [p.grad.clone() for p in stack.parameters()]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
