"""torch.compile: compiled blocks inside the reversible stack, and the fused ops traced in a graph.
DESIGN 6: compile the blocks, not the stack (its autograd.Function would graph-break)."""
import pytest
import torch
from torch import nn

import revkernels as rk


def test_compiled_blocks_inside_reversible_stack():
    torch.manual_seed(0)
    blocks = [rk.TransformerBlock(16, 2) for _ in range(3)]
    x = torch.randn(2, 8, 16, requires_grad=True)
    eager = rk.ReversibleStack(blocks, "midpoint", h=0.5)
    compiled = rk.ReversibleStack([torch.compile(b, backend="inductor") for b in blocks], "midpoint", h=0.5)
    y_ref = eager(x)
    y_ref.sum().backward()
    g_ref = [p.grad.clone() for p in eager.parameters()]
    eager.zero_grad()
    x_grad_ref, x.grad = x.grad.clone(), None
    y = compiled(x)
    y.sum().backward()
    # Inductor fuses and reorders fp32 arithmetic: agreement to fp32 rounding over 3 layers.
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_grad_ref, rtol=1e-4, atol=1e-6)
    for p, g in zip(compiled.parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_fused_ops_trace_under_compile(monkeypatch):
    monkeypatch.undo()  # drop conftest's NaN-filling torch.empty wrappers, which Dynamo cannot trace

    def step_then_inverse(p_prev, p_cur, f):
        nxt = rk.rev_step(p_prev, p_cur, f, 0.5, 0.25)
        return rk.rev_inverse(nxt, p_cur, f, 0.5, 0.25)

    compiled = torch.compile(step_then_inverse, backend="aot_eager", fullgraph=True)
    p_prev, p_cur, f = torch.randn(3, 5, 8), torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    torch.testing.assert_close(compiled(p_prev, p_cur, f), p_prev, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["midpoint", "hamiltonian"])
def test_whole_reversible_gpt_compiles_fullgraph_and_matches_eager(monkeypatch, arch):
    # The stack's backward calls torch.autograd.grad; Dynamo traces it once asked to (the one line the
    # README gives), scoped here with config.patch around the first (compiling) call.
    monkeypatch.undo()  # conftest's NaN-filling allocator wrappers are not traceable
    torch.manual_seed(0)
    model = rk.GPT(rk.GPTConfig(vocab_size=32, seq_len=8, d_model=16, n_heads=2, n_layers=3, arch=arch))
    idx, targets = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))
    loss_ref = model(idx, targets)[1]
    loss_ref.backward()
    grads_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        loss = compiled(idx, targets)[1]
    loss.backward()
    # aot_eager runs the same kernels in the same order: equal, not just close.
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for p, g in zip(model.parameters(), grads_ref):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


class UpdateWithUnusedParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.unused = nn.Parameter(torch.zeros(3))

    def forward(self, p):
        return self.lin(p)


def test_whole_model_compile_refuses_a_parameter_left_without_gradient(monkeypatch):
    # Eager backward walks the recompute's graph to tell an unused parameter from a swapped one; a
    # traced backward cannot, so a parameter without a gradient raises instead of getting a silent None.
    monkeypatch.undo()
    stack = rk.ReversibleStack([UpdateWithUnusedParameter() for _ in range(2)], "midpoint", h=0.5)
    compiled = torch.compile(stack, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(trace_autograd_ops=True), pytest.raises(Exception, match="'unused' of block 1"):
        compiled(torch.randn(2, 4, 16, requires_grad=True)).sum().backward()
