"""Exact mode (`exact=True`): bit-exact reversibility on the int64 fixed-point grid (revkernels.fixed_point).

The reversible backward rebuilds every state with integer arithmetic, so the rebuilt initial states equal
the forward's bit for bit: `last_reconstruction_error` is max|rebuilt - P[0]| / max|P[0]| over integers,
0.0 exactly when they are bitwise equal. The forward of `reversible=False` (ordinary autograd, states as
float64 grid values) computes the same integers, so outputs agree bitwise; gradients (straight-through
rounding) differ only by fp32 accumulation order: the reversible run keeps fp32 gradient buffers, the
reference float64 ones, K * eps32 * L = 2e-5 at L = 48 with K ~ 3 (measured 1e-6 .. 3e-6).

Devices: tests that run kernels, stacks or models take conftest's `device` fixture (CPU through Triton's
interpreter, CUDA with the compiled integer kernels when present); operands are drawn on the CPU from
fixed seeds and moved, stacks built on the CPU and moved with .to(device). The memory counts (saved and
live tensor bytes) are device independent. Checks made by a constructor alone stay CPU-only.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too; must precede `import triton`

import pytest  # noqa: E402
import torch  # noqa: E402

import revkernels as rk  # noqa: E402
from revkernels import exact_ops as E  # noqa: E402
from revkernels import reference_exact as R  # noqa: E402
from revkernels.fixed_point import STATE_LIMIT, GridOverflowError, side_bytes, to_grid  # noqa: E402
from revkernels.memory import SavedTensorBytes, live_tensor_bytes  # noqa: E402
from revkernels.retrofit import retrofit_stack  # noqa: E402
from test_scheduler import hardware_bf16_rounding  # noqa: E402,F401  (fixture: compiled-kernel bf16 rounding)

D, HEADS, T, B = 32, 4, 8, 2
A_CYCLE = [0.5, -1.5, 1.25, -0.75]          # k = 1, 1, 2, 2 side bits
RTOL_48 = 2e-5


def randn(shape, seed, device="cpu", dtype=torch.float32):
    """Drawn on the CPU from `seed` (the same values on every device), moved to `device`."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def grid(shape, seed, device="cpu", scale=1.0):
    return to_grid(scale * randn(shape, seed, device))


def make(scheme, depth, dropout=0.0, device="cpu", **kw):
    torch.manual_seed(0)
    if scheme == "hamiltonian":
        return rk.HamiltonianStack([rk.AttentionBlock(D, HEADS, dropout) for _ in range(depth)],
                                   [rk.MLPBlock(D, dropout) for _ in range(depth)], exact=True, **kw).to(device)
    blocks = [rk.TransformerBlock(D, HEADS, dropout) for _ in range(depth)]
    h = {"midpoint": 0.5, "leapfrog": 0.25, "midpoint_a": 0.1}[scheme]
    if scheme == "midpoint_a" and "a" not in kw:
        kw["a"] = (A_CYCLE * depth)[:depth]
    return rk.ReversibleStack(blocks, scheme, h=h, exact=True, **kw).to(device)


def run(stack, x, reversible, seed=3, bf16=False):
    stack.reversible = reversible
    stack.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        y = stack(x)
    w = randn(y.shape, 7, y.device)
    (y * w).sum().backward()
    out = {"x.grad": x.grad}
    out.update({n: p.grad.clone() for n, p in stack.named_parameters()})
    return y.detach(), out


def rel_err(got, ref):
    return {n: ((got[n] - r).abs().max() / r.abs().max()).item() for n, r in ref.items()}


# ----------------------------------------------------------------------------- kernels vs reference

COEFS = [1.0, -1.0, 0.5, -1.5, 1.25, -0.75, torch.tensor([0.5, -1.5, 1.25, 1.0] * 9 + [2.0])]


@pytest.mark.parametrize("a", COEFS, ids=lambda a: "per_channel" if isinstance(a, torch.Tensor) else str(a))
def test_kernels_bit_identical_to_reference(a, device):
    shape = (2, 5, 37)                                          # N = 370: a partial tile and a partial byte
    x, y = grid(shape, 0, device), grid(shape, 1, device)
    f = randn(shape, 2, device)
    m, k = E._coef_a(a, x)
    flag = E.new_flag(device)
    out = torch.empty_like(x)
    side = torch.zeros((k, E._nb(x.numel())), dtype=torch.uint8, device=device) if k else None
    E.exact_three_term_(out, x, y, f, m, k, 0.3, side, flag)
    ref_out, ref_side, flags = R.three_term_step(x, y, f, m, k, 0.3)
    assert torch.equal(out, ref_out) and flags == 0 and flag.item() == 0
    assert (side is None and ref_side is None) or torch.equal(side, ref_side)
    back = torch.empty_like(x)
    E.exact_three_term_(back, out, y, f, m, k, 0.3, side, flag, inverse=True)
    assert torch.equal(back, x) and torch.equal(R.three_term_inverse(out, y, f, m, k, 0.3, side)[0], x)
    gA, gB = torch.randn(shape, device=device), torch.randn(shape, device=device)
    A, gA_k, gB_k = out.clone(), gA.clone(), gB.clone()
    gf = E.exact_backward_step_(A, y, f, gA_k, gB_k, m, k, 0.3, side, flag)
    A_ref, gA_ref, gB_ref, gf_ref, _ = R.backward_step(out, y, f, gA, gB, m, k, 0.3, side)
    for got, want in ((A, x), (A_ref, x), (gA_k, gA_ref), (gB_k, gB_ref), (gf, gf_ref)):
        assert torch.equal(got, want)
    assert flag.item() == 0


@pytest.mark.parametrize("alpha", (1, -1))
def test_coupling_kernel_bit_identical_and_invertible(alpha, device):
    X, g = grid((3, 7, 16), 0, device), torch.randn(3, 7, 16, dtype=torch.bfloat16, device=device)
    flag = E.new_flag(device)
    out = torch.empty_like(X)
    E.exact_coupling_(out, X, g, alpha, flag)
    assert torch.equal(out, R.coupling(X, g, alpha)[0])
    gx = torch.randn(3, 7, 16, device=device)
    back, gx_k = torch.empty_like(X), gx.clone()
    E.exact_coupling_(back, out, g, alpha, flag, inverse=True, gx=gx_k)
    assert torch.equal(back, X) and torch.equal(gx_k, alpha * gx) and flag.item() == 0


def test_public_ops_roundtrip_and_side_bytes(device):
    shape = (4, 3, 21)
    x, y = grid(shape, 0, device), grid(shape, 1, device)
    f = torch.randn(shape, device=device)
    nxt, side = E.exact_rev_step(x, y, f, 1.25, 0.5)            # 1.25 = 5/2^2: two bit planes
    assert side.shape == (2, 32) and side.numel() == side_bytes(x.numel(), 2)
    assert torch.equal(E.exact_rev_inverse(nxt, y, f, 1.25, 0.5, side), x)
    buf = nxt.clone()
    E.exact_rev_inverse(buf, y, f, 1.25, 0.5, side, out=buf)
    assert torch.equal(buf, x)
    assert E.exact_rev_step(x, y, f, -1.0, 0.5)[1] is None


# ----------------------------------------------------------------------------- validation, overflow

def _buffers(device):
    shape = (2, 4, 8)
    return (grid(shape, 0, device), grid(shape, 1, device), torch.randn(shape, device=device),
            torch.randn(shape, device=device), torch.randn(shape, device=device))


@pytest.mark.parametrize("case", ["float_state", "non_contiguous", "shape", "non_dyadic", "zero_a", "side_shape",
                                  "alias", "huge_f", "nan_f", "state_range", "input_range"])
def test_bad_inputs_leave_buffers_untouched(case, device):
    A, B_, f, gA, gB = _buffers(device)
    side = torch.zeros((1, 8), dtype=torch.uint8, device=device)
    a, kw = 0.5, {}
    if case == "float_state":
        B_ = B_.double()
    elif case == "non_contiguous":
        B_ = B_.transpose(0, 1)
    elif case == "shape":
        f = f[:1]
    elif case == "non_dyadic":
        a = 0.3
    elif case == "zero_a":
        a = 0.0
    elif case == "side_shape":
        side = side[:, :4]
    elif case == "alias":
        gB = gA
    elif case == "huge_f":
        f[0, 0, 0] = 1e9
    elif case == "nan_f":
        f[1, 2, 3] = float("nan")
    elif case == "state_range":
        A[0, 0, 0], B_[0, 0, 0] = STATE_LIMIT, -STATE_LIMIT          # the step would leave the range
        a = -1.0
    elif case == "input_range":
        A[0, 0, 0] = STATE_LIMIT + 5
    before = [t.clone() for t in (A, B_, gA, gB, side)]
    err = (GridOverflowError if case in ("huge_f", "nan_f", "state_range", "input_range")
           else (TypeError, ValueError))
    with pytest.raises(err) as info:
        if case == "state_range":
            E.exact_rev_step(A, B_, f, a, 0.5, out=A)
        else:
            E.exact_rev_backward_step(A, B_, f, gA, gB, a, 0.5, side if a == 0.5 else None, **kw)
    if err is GridOverflowError:
        assert "overflow" in str(info.value) and "range" in str(info.value)
    if case == "non_dyadic":
        assert "nearest allowed value is 0.30078125" in str(info.value)
    for t, b in zip((A, B_, gA, gB, side), before):
        assert torch.equal(t, b), case


def test_non_dyadic_a_refused_with_nearest_value():
    with pytest.raises(ValueError, match=r"nearest allowed value is 0\.30078125"):
        make("midpoint_a", 2, a=0.3)
    with pytest.raises(ValueError, match="too large"):
        make("midpoint_a", 2, a=3.0 + 1 / 256)
    with pytest.raises(ValueError, match="learnable_a"):
        make("midpoint_a", 2, learnable_a=True)
    with pytest.raises(ValueError, match=r"\{1, -1\}"):
        make("hamiltonian", 2, a=0.5)
    with pytest.raises(ValueError, match="reversible arch"):
        rk.GPTConfig(arch="baseline", exact=True)


def test_eq37_draws_rounded_onto_quarter_grid():
    stack = rk.ReversibleStack([rk.TransformerBlock(D, HEADS) for _ in range(16)], "midpoint_a", exact=True,
                               generator=torch.Generator().manual_seed(0))
    a4 = stack.a * 4
    assert torch.equal(a4, a4.round()) and bool((stack.a.abs() >= 0.5).all() and (stack.a.abs() <= 1.5).all())


class _Shift(torch.nn.Module):
    """f(p) = v everywhere."""

    def __init__(self, v):
        super().__init__()
        self.v = torch.nn.Parameter(torch.tensor(float(v)))

    def forward(self, p):
        return p * 0 + self.v


@pytest.mark.parametrize("reversible", (True, False))
def test_overflow_raises(reversible, device):
    with pytest.raises(GridOverflowError, match="overflow.*range"):
        stack = make("leapfrog", 2, device=device)
        stack.reversible = reversible
        stack(torch.full((B, T, D), 3e6, device=device))
    for update, what in ((3e6, "update"), (3e5, "state")):    # one update beyond 2^20; or states growing
        stack = rk.ReversibleStack([_Shift(update) for _ in range(4)], "leapfrog", h=1.0, exact=True).to(device)
        stack.reversible = reversible               # leapfrog: P[j] = P[0] + v*j(j+1)/2, 1.8e6 at j = 3
        with pytest.raises(GridOverflowError, match=f"overflow.*{what}.*range"):
            stack(torch.randn(B, T, D, device=device))


# ----------------------------------------------------------------------------- stacks vs ordinary autograd

@pytest.mark.parametrize("scheme,depth", [("leapfrog", 48), ("midpoint", 49), ("midpoint_a", 48),
                                          ("hamiltonian", 48)])
def test_exact_stack_bit_exact_and_matches_autograd(scheme, depth, device):
    stack = make(scheme, depth, device=device)
    x = randn((B, T, D), 1, device)
    y_rev, g_rev = run(stack, x, True)
    assert stack.last_reconstruction_error == 0.0           # rebuilt P[0] (and P[-1] / Q[0]) bitwise equal
    y_ref, g_ref = run(stack, x, False)
    assert torch.equal(y_rev, y_ref)                         # the same integers, so the same outputs
    errs = rel_err(g_rev, g_ref)
    assert max(errs.values()) <= RTOL_48, max(errs.items(), key=lambda kv: kv[1])
    expected = sum(side_bytes(x.numel(), k) for k in ([1, 1, 2, 2] * depth)[:depth]) if scheme == "midpoint_a" else 0
    assert stack.last_side_info_bytes == expected


@pytest.mark.parametrize("scheme", ("midpoint_a", "hamiltonian"))
def test_non_contiguous_input_gives_the_contiguous_result(scheme, device):
    """A transposed (B, T, d) view: the kernels read states, updates and gradients in one flat order, so
    the grid state must be laid out like them (a layout mix-up rebuilds bit for bit, but wrong values)."""
    stack = make(scheme, 3, device=device)
    x = randn((T, B, D), 1, device).transpose(0, 1)
    assert not x.is_contiguous()
    y, g = run(stack, x, True)
    y_c, g_c = run(stack, x.contiguous(), True)
    assert torch.equal(y, y_c)
    for name, ref in g_c.items():
        assert torch.equal(g[name], ref), name


def test_coefficients_changed_in_place_are_used(device):
    """The dyadic split of a is cached between forwards (it reads a on the host); an in-place change of a
    must be picked up, as must a move to another device."""
    stack = make("midpoint_a", 4, device=device)
    x = randn((B, T, D), 1, device)
    stack(x)
    with torch.no_grad():
        stack.a.copy_(torch.tensor([1.25, -0.75, 0.5, -1.5]))
    fresh = make("midpoint_a", 4, device=device, a=[1.25, -0.75, 0.5, -1.5])
    assert torch.equal(stack(x), fresh(x))


def test_bf16_autocast_with_dropout_reconstructs_exactly(device, hardware_bf16_rounding):
    """Blocks in bf16 with dropout: the recompute replays the RNG (CUDA's generator on CUDA) and the
    device's autocast, so it sees the same input bits and returns the same f; the rebuild is exact.
    Gradients vs the bf16 reference (same masks): fp32 accumulation order, as in fp32 (measured 1e-6
    at depth 8 on CPU)."""
    stack = make("leapfrog", 8, dropout=0.1, device=device)
    x = randn((B, T, D), 1, device)
    y_rev, g_rev = run(stack, x, True, bf16=True)
    assert stack.last_reconstruction_error == 0.0
    y_ref, g_ref = run(stack, x, False, bf16=True)
    assert torch.equal(y_rev, y_ref)
    y_other, _ = run(stack, x, False, seed=4, bf16=True)
    assert not torch.equal(y_other, y_ref)                   # dropout was active: other masks, other output
    assert max(rel_err(g_rev, g_ref).values()) <= 1e-4


# ----------------------------------------------------------------------------- memory

def _activation_bytes(scheme, depth, device):
    stack = make(scheme, depth, device=device)
    x = torch.randn(B, T, D, device=device, requires_grad=True)
    exclude = [*stack.parameters(), *stack.buffers(), x]
    with SavedTensorBytes(exclude=exclude) as saved:
        stack(x)
    before = live_tensor_bytes(exclude)
    y = stack(x)
    live = live_tensor_bytes(exclude) - before
    y.sum().backward()
    return saved.bytes, live, stack.last_side_info_bytes


@pytest.mark.parametrize("scheme", ("leapfrog", "hamiltonian"))
def test_memory_flat_in_depth_for_unit_a(scheme, device):
    """Two int64 states (8 B per element each) whatever the depth, plus the fp32 output; x is excluded
    (kept for the meter, it is the caller's). Measured: saved 8192 B at depth 4 and 24; live 10272 and
    10432 B: the int64 coefficient m_j, 8 B per layer (the float stacks keep a and c, 8 B per layer too)."""
    n = B * T * D
    s4, l4, side4 = _activation_bytes(scheme, 4, device)
    s24, l24, side24 = _activation_bytes(scheme, 24, device)
    assert s4 == s24 == 2 * 8 * n and side4 == side24 == 0
    assert 0 <= l24 - l4 <= 8 * (24 - 4) and 2 * 8 * n <= l24 <= 2 * 8 * n + 4 * n + 1024


def test_side_bits_memory_k_bits_per_element_per_layer(device):
    n = B * T * D
    _, l4, side4 = _activation_bytes("midpoint_a", 4, device)
    _, l8, side8 = _activation_bytes("midpoint_a", 8, device)
    assert side4 == 6 * n // 8 and side8 == 12 * n // 8       # 1 + 1 + 2 + 2 bits per element per 4 layers
    assert l8 - l4 == side8 - side4      # only the side bits grow (m_j = a_j * 2^k_j: built once, held by the stack)


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("arch", ("midpoint", "leapfrog", "midpoint_a", "hamiltonian"))
def test_exact_gpt_trains(arch, device):
    torch.manual_seed(0)
    cfg = rk.GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=3, arch=arch, exact=True,
                       a=[0.5, -0.75, 1.25] if arch == "midpoint_a" else None)
    model = rk.GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0)).to(device)
    losses = []
    for _ in range(6):
        _, loss = model(idx[:, :-1], idx[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert model.body.last_reconstruction_error == 0.0
    assert losses[-1] < 0.8 * losses[0], losses


def test_retrofit_exact(device):
    """Retrofits a model already on `device` (the student's stack follows its blocks' device)."""
    torch.manual_seed(0)
    model = rk.GPT(rk.GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_heads=4, n_layers=3)).to(device)
    with pytest.raises(ValueError, match="nearest allowed value"):
        rk.retrofit(model, a=0.3, exact=True)
    student = rk.retrofit(model, a=0.5, exact=True)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    outs = []
    for reversible in (True, False):
        retrofit_stack(student).reversible = reversible
        student.zero_grad(set_to_none=True)
        logits, loss = student(idx[:, :-1], idx[:, 1:].contiguous())
        loss.backward()
        outs.append((logits.detach(), [p.grad.clone() for p in student.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for g_rev, g_ref in zip(outs[0][1], outs[1][1]):
        assert (g_rev - g_ref).abs().max() <= 1e-5 * g_ref.abs().max()
