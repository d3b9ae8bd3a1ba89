"""Activation memory flat in depth (DESIGN 4 and 6: measure live tensors, not intentions).

Two measurements, each of its own forward, parameters, buffers and the input excluded:
  saved: bytes packed by saved_tensors_hooks during the forward (revkernels.memory.SavedTensorBytes);
  live:  bytes of all tensor storages alive after the forward minus those alive before it
         (revkernels.memory.live_tensor_bytes: a gc scan plus the autograd graphs' saved tensors),
         taken inside a helper so no stale local of the caller is counted. It includes the output.
State tensor: B*T*d fp32 = 2*16*64*4 = 8 KiB. Reversible stacks keep exactly two (p[L-1], p[L], or
q[L], p[L]; the output is p[L] itself) whatever the depth; ordinary autograd keeps every block's
activations, ~L times a block's.

Devices: both measurements count tensor storages (untyped_storage().nbytes(), the bytes asked for, not
the caching allocator's blocks), so they are device independent and the stack tests take conftest's
`device` fixture (CPU through Triton's interpreter, CUDA with the compiled kernels when present).
The one device-specific count is the RNG state the dropout replay keeps per block call: the CPU
generator's, plus the CUDA generator's on CUDA (see rng_state_bytes).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too; must precede `import triton`

import pytest  # noqa: E402
import torch  # noqa: E402

import revkernels as rk  # noqa: E402
from revkernels.memory import SavedTensorBytes, live_tensor_bytes, saved_tensor_bytes  # noqa: E402

D, HEADS, T, B = 64, 4, 16, 2
STATE = B * T * D * 4
SHALLOW, DEEP = 4, 32


def make(kind, depth, device, dropout=0.0):
    torch.manual_seed(0)
    if kind == "hamiltonian":
        return rk.HamiltonianStack([rk.AttentionBlock(D, HEADS, dropout) for _ in range(depth)],
                                   [rk.MLPBlock(D, dropout) for _ in range(depth)]).to(device)
    return rk.ReversibleStack([rk.TransformerBlock(D, HEADS, dropout) for _ in range(depth)], kind,
                              h=0.25).to(device)


def rng_state_bytes(device):
    """Bytes of the RNG states one replayed block call keeps (revkernels.replay.ForwardContext): the
    CPU generator's state, and on CUDA the device generator's too."""
    n = torch.get_rng_state().numel()                      # uint8 tensors: numel = bytes
    return n + (torch.cuda.get_rng_state(device).numel() if device.type == "cuda" else 0)


def _live_after_forward(stack, x, exclude):
    """(output, live bytes it added); the baseline is taken here, in a fresh frame, so no stale local
    of the caller is counted."""
    before = live_tensor_bytes(exclude)
    y = stack(x)
    return y, live_tensor_bytes(exclude) - before


def activation_bytes(kind, depth, reversible, device, dropout=0.0):
    """(saved, live) bytes of a forward. Two separate forwards: the pack hook hands each saved tensor
    to Python, which would let the gc scan see tensors it otherwise cannot, so the live measurement
    runs without hooks and stands on its own."""
    stack = make(kind, depth, device, dropout)
    stack.reversible = reversible
    x = torch.randn(B, T, D, device=device, requires_grad=True)
    exclude = [*stack.parameters(), *stack.buffers(), x]
    with SavedTensorBytes(exclude=exclude) as saved:
        stack(x)
    y, live = _live_after_forward(stack, x, exclude)
    y.sum().backward()                       # the graph was usable: the measurement was of a real one
    assert all(p.grad is not None for p in stack.parameters())
    return saved.bytes, live


KINDS = ("midpoint", "leapfrog", "midpoint_a", "hamiltonian")


@pytest.mark.parametrize("kind", KINDS)
def test_reversible_memory_flat_in_depth(kind, device):
    s4, l4 = activation_bytes(kind, SHALLOW, True, device)
    s32, l32 = activation_bytes(kind, DEEP, True, device)
    # Measured: saved 16384 = live 16384 at depth 4 and 32, every kind: two states, exactly.
    for shallow, deep in ((s4, s32), (l4, l32)):
        assert abs(deep - shallow) <= 0.03 * shallow
        assert 2 * STATE <= deep <= 2.1 * STATE, deep


@pytest.mark.parametrize("kind", ("midpoint", "hamiltonian"))
def test_ordinary_autograd_memory_grows_linearly(kind, device):
    s4, l4 = activation_bytes(kind, SHALLOW, False, device)
    s32, l32 = activation_bytes(kind, DEEP, False, device)
    # Measured on CPU: midpoint saved 520208 -> 4219008 (8.11x), live 528400 -> 4227200 (8.00x); hamiltonian
    # saved 520192 -> 4218880, live 528448 -> 4227584. Every block saves the same activations, so the
    # ratio is 32/4 = 8 up to O(1) extras (on CUDA too: its attention saves other tensors, the same
    # in every block).
    for shallow, deep in ((s4, s32), (l4, l32)):
        assert 7.5 < deep / shallow < 8.5, (shallow, deep)
    # And the point of it all: at depth 32 the reversible stack's two states are > 100x less.
    assert l32 > 100 * 2 * STATE


def test_the_two_measurements_agree(device):
    """Live bytes (graph walk) and saved bytes (hooks) count the same activations; the gc scan alone
    would miss tensors with no Python object, such as LayerNorm's mean/rstd and SDPA's logsumexp."""
    saved, live = activation_bytes("midpoint", SHALLOW, False, device)
    # Everything alive after the forward is either saved for backward or the output p[L], which
    # nothing saves: exactly one state more (the gc scan alone comes out 4128 bytes short here).
    assert live == saved + STATE, (saved, live)


@pytest.mark.parametrize("kind", ("midpoint", "hamiltonian"))
def test_dropout_costs_only_rng_states(kind, device):
    """With dropout the replay keeps one CPU RNG state per block call (5056 bytes, on ctx, so only the
    live scan sees it), and on CUDA the CUDA generator's state too: per-layer O(1) state, nothing of
    size B*T*d. Measured live bytes (CPU): midpoint 36608 -> 178176 = 16384 + L * 5056; hamiltonian
    56832 -> 339968 = 16384 + 2L * 5056."""
    rng = rng_state_bytes(device)
    calls_per_layer = 2 if kind == "hamiltonian" else 1
    (s4, l4), (s32, l32) = (activation_bytes(kind, n, True, device, dropout=0.1) for n in (SHALLOW, DEEP))
    assert s4 == s32 == 2 * STATE
    assert l32 - l4 == (DEEP - SHALLOW) * calls_per_layer * rng


@pytest.mark.parametrize("kind", ("leapfrog", "hamiltonian"))
def test_nothing_survives_backward(kind, device):
    """After backward and dropping the output, nothing is left but the gradients (no states on ctx,
    no retained graph, no stray references)."""
    stack = make(kind, 8, device)
    x = torch.randn(B, T, D, device=device, requires_grad=True)
    exclude = [*stack.parameters(), *stack.buffers(), x]

    def cycle():
        before = live_tensor_bytes(exclude)
        stack(x).sum().backward()
        return before

    before = cycle()
    # Kept by design: the gradients and the meter's 0-d reconstruction error (read lazily, no sync).
    kept = [p.grad for p in stack.parameters()] + [x.grad, stack._reconstruction_error]
    assert live_tensor_bytes(exclude + kept) <= before


def test_saved_tensor_bytes_helper_counts_parameters_unless_excluded(device):
    stack = make("midpoint", 2, device)
    stack.reversible = False
    x = torch.randn(B, T, D, device=device, requires_grad=True)
    _, with_params = saved_tensor_bytes(stack, x)
    with SavedTensorBytes(exclude=stack.parameters()) as m:
        stack(x)
    weights = sum(p.numel() * 4 for n, p in stack.named_parameters() if n.endswith("weight") and p.dim() == 2)
    assert with_params - m.bytes >= weights      # every Linear saves its weight for grad_input


def test_live_tensor_bytes_on_a_compiled_graph():
    """A torch.compile'd graph's node (AOTAutograd's CompiledFunctionBackward) raises RuntimeError, not
    AttributeError, on any saved-tensor access once its backward has freed them: the scan must skip it.
    backend="aot_eager" builds the same node as inductor without needing a C compiler. Each count is of
    a helper frame, parameters and input excluded. Measured (B=8, d=32, hidden 64, fp32): eager 5120 =
    compiled 5120 bytes during the forward (Linear-1 output 2048, GELU output 2048, output 1024); after
    the backward only the output (1024) is left. CPU-only: it tests the scan of an AOTAutograd node,
    which is the same object on every device; no revkernels code runs here."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    x = torch.randn(8, 32, requires_grad=True)
    exclude = [*mlp.parameters(), x]
    out_bytes = 8 * 32 * 4

    def during_and_after(model):
        before = live_tensor_bytes(exclude)
        y = model(x)
        during = live_tensor_bytes(exclude) - before
        y.sum().backward()
        after = live_tensor_bytes(exclude + [p.grad for p in mlp.parameters()] + [x.grad]) - before
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        return during, after

    eager = during_and_after(mlp)
    compiled = during_and_after(torch.compile(mlp, backend="aot_eager", fullgraph=True))
    assert compiled == eager, (compiled, eager)
    assert eager[0] > out_bytes and eager[1] == out_bytes
