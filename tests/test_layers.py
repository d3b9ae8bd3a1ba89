"""Layers: the forward equals the paper's recurrences written out by hand, TransformerBlock is eq. 2.5,
the scheme table's coefficients, eq. 3.7's draw, the attention dispatch, and bad configurations
refused with clear errors (DESIGN 1-2).

Devices: tests that run a layer take conftest's `device` fixture (CPU through Triton's interpreter;
CUDA with the compiled kernels and CUDA's attention when present). Blocks are built on the CPU from
fixed seeds and moved with .to(device). Tests of construction alone (the scheme table, eq. 3.7's
draw, refusals raised by a constructor) touch no device code and stay CPU-only."""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too; must precede `import triton`

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import revkernels as rk  # noqa: E402

D, HEADS, T, B = 32, 4, 8, 2
EPS32 = torch.finfo(torch.float32).eps


def blocks(n, seed=0, **kw):
    torch.manual_seed(seed)
    return [rk.TransformerBlock(D, HEADS, **kw) for _ in range(n)]


def halves(n, seed=0):
    torch.manual_seed(seed)
    return [rk.AttentionBlock(D, HEADS) for _ in range(n)], [rk.MLPBlock(D) for _ in range(n)]


def x_in(device="cpu", seed=1):
    """(B, T, D) drawn on the CPU from `seed` (the same values on every device), moved to `device`."""
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed)).to(device)


def ulps(device):
    """Rounding allowance, in eps32 per layer, of a layer against the hand-written equations. CPU:
    5 (measured <= 0.7: SDPA's math and the hand-written softmax sum in different orders). CUDA: 20,
    not measured here: SDPA's fp32 kernels (memory-efficient attention) compute the softmax online,
    blockwise with rescaling and exp2 of pre-scaled scores, so they round differently from the
    hand-written softmax by more ulps than the CPU path; a wrong formula would still miss by O(1)."""
    return 5 if torch.device(device).type == "cpu" else 20


def rel(got, ref):
    return ((got - ref).abs().max() / ref.abs().max()).item()


# ----------------------------------------------------------------------------- the paper, by hand

def masked_softmax_attention(q, k, v):
    """softmax(q k^T / sqrt(hd) with the future masked to -inf) v, for (B, H, T, hd)."""
    n = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


def eq_2_5(block, p):
    """f(p) = Attn(LN1(p)) + MLP(LN2(p + Attn(LN1(p)))) from the block's weights, by hand."""
    at, mlp = block.attn, block.mlp

    def attn(x):
        h = F.layer_norm(x, (D,), at.ln.weight, at.ln.bias, at.ln.eps)
        q, k, v = (h @ at.attn.qkv.weight.T + at.attn.qkv.bias).split(D, dim=-1)
        heads = [t.reshape(B, T, HEADS, D // HEADS).transpose(1, 2) for t in (q, k, v)]
        y = masked_softmax_attention(*heads).transpose(1, 2).reshape(B, T, D)
        return y @ at.attn.proj.weight.T + at.attn.proj.bias

    def ffn(x):
        h = F.layer_norm(x, (D,), mlp.ln.weight, mlp.ln.bias, mlp.ln.eps)
        return F.gelu(h @ mlp.mlp.fc.weight.T + mlp.mlp.fc.bias) @ mlp.mlp.proj.weight.T + mlp.mlp.proj.bias

    u = attn(p)
    return u + ffn(p + u)


def paper_three_term(fs, x, a, c):
    """eq. 3.6 with p[-1] = p[0] = x: p[j+1] = a_j p[j-1] + (1 - a_j) p[j] + c_j f_j(p[j]); returns p[L]."""
    p_prev = p_cur = x
    for j, f in enumerate(fs):
        p_prev, p_cur = p_cur, a[j] * p_prev + (1 - a[j]) * p_cur + c[j] * f(p_cur)
    return p_cur


def paper_hamiltonian(attns, mlps, x, a, b):
    """eqs. 2.8-2.9 with q[0] = p[0] = x: q[l] = a q[l-1] + G_l(p[l-1]); p[l] = b p[l-1] + M_l(q[l])."""
    q = p = x
    for G, M in zip(attns, mlps):
        q = a * q + G(p)
        p = b * p + M(q)
    return p


def paper_coefficients(scheme, h, n, a=None):
    """The scheme table of DESIGN 1, independent of ReversibleStack's own table."""
    if scheme == "midpoint":
        return [1.0] * n, [2 * h] * n
    if scheme == "leapfrog":
        return [-1.0] * n, [h * h] * n
    return list(a), [h] * n


def test_transformer_block_is_eq_2_5(device):
    blk = rk.TransformerBlock(D, HEADS).to(device)
    p = x_in(device)
    assert blk.mlp.mlp.fc.out_features == 4 * D                       # GELU MLP of width 4d
    # fp32, one block: SDPA and the hand-written softmax sum in different orders: a few ulps of the
    # O(1) output (measured 1.8e-7 on CPU; CUDA's online softmax: see ulps()).
    tol = 1e-6 * ulps(device) / ulps("cpu")
    torch.testing.assert_close(blk(p), eq_2_5(blk, p), rtol=tol, atol=tol)


@pytest.mark.parametrize("depth", (1, 4, 7))
@pytest.mark.parametrize("scheme", ("midpoint", "leapfrog", "midpoint_a"))
def test_three_term_forward_is_the_paper_recurrence(scheme, depth, device):
    h = 0.3
    a = [1.25, -0.75, 0.6, -1.4, 0.9, -0.5, 1.5][:depth] if scheme == "midpoint_a" else None
    bl = blocks(depth)
    stack = rk.ReversibleStack(bl, scheme, h=h, a=a).to(device)       # moves the blocks of bl too
    x = x_in(device)
    a_p, c_p = paper_coefficients(scheme, h, depth, a)
    with torch.no_grad():
        expected = paper_three_term([lambda p, b=b: eq_2_5(b, p) for b in bl], x, a_p, c_p)
        for reversible in (True, False):
            stack.reversible = reversible
            # fp32: the hand-written block and update round differently from SDPA / the fused kernel:
            # a few ulps per layer, carried through <= 7 block Jacobians (measured <= 5.2e-7, i.e.
            # <= 0.7 eps per layer on CPU; see ulps()).
            assert rel(stack(x), expected) < ulps(device) * EPS32 * depth, reversible


@pytest.mark.parametrize("depth", (1, 4))
def test_hamiltonian_forward_is_the_paper_recurrence(depth, device):
    attns, mlps = halves(depth)
    stack = rk.HamiltonianStack(attns, mlps, a=0.8, b=1.25).to(device)
    x = x_in(device)
    with torch.no_grad():
        expected = paper_hamiltonian(attns, mlps, x, 0.8, 1.25)
        for reversible in (True, False):
            stack.reversible = reversible
            # Measured on CPU: 0 (the same blocks); the coupling kernel may round a*q + G(p) once
            # less than PyTorch (an FMA on CUDA): an ulp per sub-step.
            assert rel(stack(x), expected) < 5 * EPS32 * depth, reversible


@pytest.mark.parametrize("scheme", ("midpoint", "leapfrog", "midpoint_a", "hamiltonian"))
def test_reference_mode_gradients_equal_the_paper_recurrence(scheme, device):
    """reversible=False is the reference the scheduler tests compare against: check that its own
    gradients are autograd of the hand-written recurrence (same blocks, so same rounding up to the
    order of the update's three terms)."""
    depth, h = 3, 0.4
    x = x_in(device)
    grads = []
    for by_hand in (False, True):
        if scheme == "hamiltonian":
            attns, mlps = halves(depth)
            stack = rk.HamiltonianStack(attns, mlps).to(device)
            fwd = (lambda xx: paper_hamiltonian(attns, mlps, xx, 1.0, 1.0)) if by_hand else stack
        else:
            bl = blocks(depth)
            a = [0.7, -1.2, 1.3] if scheme == "midpoint_a" else None
            stack = rk.ReversibleStack(bl, scheme, h=h, a=a).to(device)
            a_p, c_p = paper_coefficients(scheme, h, depth, a)
            fwd = (lambda xx: paper_three_term(bl, xx, a_p, c_p)) if by_hand else stack
        stack.reversible = False
        xx = x.clone().requires_grad_(True)
        (fwd(xx) * torch.linspace(-1, 1, D, device=device)).sum().backward()
        grads.append([xx.grad] + [p.grad for p in stack.parameters()])
    for got, exp in zip(*grads):
        assert rel(got, exp) < 1e-5


# ----------------------------------------------------------------------------- coefficients

@pytest.mark.parametrize("scheme, a_expected, c_expected", [
    ("midpoint", 1.0, 2 * 0.3), ("leapfrog", -1.0, 0.3 ** 2), ("midpoint_a", None, 0.3)])
def test_scheme_table(scheme, a_expected, c_expected):
    stack = rk.ReversibleStack(blocks(3), scheme, h=0.3, generator=torch.Generator().manual_seed(0))
    assert stack.c.shape == (3,) and torch.allclose(stack.c, torch.full((3,), c_expected))
    if a_expected is not None:
        assert torch.equal(stack.a, torch.full((3,), a_expected))
    # a, c are buffers (saved with the model, moved by .to()), not parameters, unless learnable_a.
    assert {"a", "c"} <= set(stack.state_dict()) and "a" not in dict(stack.named_parameters())


@pytest.mark.parametrize("a, expected", [
    (0.75, torch.full((3,), 0.75)),
    ([0.5, -1.0, 1.5], torch.tensor([0.5, -1.0, 1.5])),
    (torch.tensor([0.5, -1.0, 1.5]), torch.tensor([0.5, -1.0, 1.5])),
    (torch.tensor(-0.6), torch.full((3,), -0.6)),
    (torch.full((3, D), 0.9), torch.full((3, D), 0.9)),
])
def test_midpoint_a_accepts_float_list_tensor_per_channel(a, expected, device):
    stack = rk.ReversibleStack(blocks(3), "midpoint_a", h=0.3, a=a).to(device)
    assert torch.equal(stack.a, expected.to(device))
    assert stack(x_in(device)).shape == (B, T, D)


def test_midpoint_a_does_not_alias_the_callers_tensor():
    a = torch.tensor([0.5, -1.0, 1.5])
    stack = rk.ReversibleStack(blocks(3), "midpoint_a", a=a)
    a[0] = 0.0                                     # the caller's tensor changing later
    assert stack.a[0] == 0.5


def test_learnable_a_is_a_parameter():
    stack = rk.ReversibleStack(blocks(2), "midpoint_a", a=[0.7, -0.9], learnable_a=True)
    assert isinstance(stack.a, nn.Parameter) and "a" in dict(stack.named_parameters())


# ----------------------------------------------------------------------------- eq. 3.7

def test_draw_midpoint_a_is_seedable_and_in_range():
    a1 = rk.draw_midpoint_a(4000, torch.Generator().manual_seed(3))
    a2 = rk.draw_midpoint_a(4000, torch.Generator().manual_seed(3))
    a3 = rk.draw_midpoint_a(4000, torch.Generator().manual_seed(4))
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    pos, neg = a1[a1 > 0], a1[a1 < 0]
    # 1 + U(-1,1)/2 in [0.5, 1.5]; -1 + U(-1,1)/2 in [-1.5, -0.5]; never near 0.
    assert ((pos >= 0.5) & (pos <= 1.5)).all() and ((neg >= -1.5) & (neg <= -0.5)).all()
    assert pos.numel() + neg.numel() == 4000
    # Each branch with probability 1/2: 2000 +- 4.5 sigma (sigma = sqrt(4000)/2 = 31.6).
    assert abs(pos.numel() - 2000) < 142
    # Uniform within each branch: mean 1 / -1, variance of U(-1,1)/2 = 1/12.
    assert abs(pos.mean() - 1) < 0.03 and abs(neg.mean() + 1) < 0.03
    assert abs(a1.abs().var() - 1 / 12) < 0.01


def test_midpoint_a_draw_reproducible_from_generator():
    s1 = rk.ReversibleStack(blocks(6), "midpoint_a", generator=torch.Generator().manual_seed(9))
    s2 = rk.ReversibleStack(blocks(6), "midpoint_a", generator=torch.Generator().manual_seed(9))
    s3 = rk.ReversibleStack(blocks(6), "midpoint_a", generator=torch.Generator().manual_seed(10))
    assert torch.equal(s1.a, s2.a) and not torch.equal(s1.a, s3.a)
    assert torch.equal(s1.a, rk.draw_midpoint_a(6, torch.Generator().manual_seed(9)))


# ----------------------------------------------------------------------------- attention dispatch

@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_causal_attention_is_masked_softmax(dtype, rtol, device):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, dtype=dtype).to(device) for _ in range(3))
    out = rk.causal_attention(q, k, v)
    assert rk.last_attention_backend() == "sdpa"     # CPU, or fp32/fp64 on CUDA: never flash_attn
    torch.testing.assert_close(out, masked_softmax_attention(q, k, v), rtol=rtol, atol=rtol)
    # Causality: the first query sees only the first key.
    torch.testing.assert_close(out[..., 0, :], v[..., 0, :], rtol=rtol, atol=rtol)


def test_attention_dropout_uses_the_global_generator(device):
    """The global generator of q's device (CUDA's on CUDA): torch.manual_seed seeds both."""
    q = k = v = torch.randn(1, 2, 6, 4, device=device)
    torch.manual_seed(0)
    o1 = rk.causal_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    o2 = rk.causal_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(o1, o2) and not torch.equal(o1, rk.causal_attention(q, k, v))


def test_block_reports_backend(device):
    rk.TransformerBlock(D, HEADS).to(device)(x_in(device))
    assert rk.last_attention_backend() == "sdpa"                   # fp32: never flash_attn


# ----------------------------------------------------------------------------- bad configurations

class Widen(nn.Module):
    """A block mapping (B, T, d) to (B, T, d + 1): not an update of the state."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D + 1)

    def forward(self, x):
        return self.lin(x)


class Tupled(nn.Module):
    def forward(self, x):
        return x, x


PER_CHANNEL_WITH_A_ZERO = torch.ones(3, D)
PER_CHANNEL_WITH_A_ZERO[1, 5] = 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(scheme="euler"), "scheme"),
    (dict(scheme="midpoint_a", a=[1.0, 0.0, -1.0]), "a contains 0"),
    (dict(scheme="midpoint_a", a=0.0), "a contains 0"),
    (dict(scheme="midpoint_a", a=PER_CHANNEL_WITH_A_ZERO), "a contains 0"),
    (dict(scheme="midpoint_a", a=[1.0, -1.0]), "3 per-layer values"),
    (dict(scheme="midpoint_a", a=[1.0, -1.0, 0.5, 0.7]), "3 per-layer values"),
    (dict(scheme="midpoint_a", a=torch.ones(3, D, 2)), "3 per-layer values"),
    (dict(scheme="midpoint", a=0.5), "only with scheme='midpoint_a'"),
    (dict(scheme="leapfrog", a=[1.0, 1.0, 1.0]), "only with scheme='midpoint_a'"),
    (dict(preserve_rng_state="sometimes"), "preserve_rng_state"),
])
def test_bad_three_term_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rk.ReversibleStack(blocks(3), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(h="0.5"), "h must be"), (dict(h=float("nan")), "h must be"), (dict(h=True), "h must be"),
    (dict(state_dtype=torch.int32), "state_dtype"),
])
def test_bad_three_term_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        rk.ReversibleStack(blocks(2), "midpoint", **kwargs)


def test_empty_blocks_refused():
    with pytest.raises(ValueError, match="empty"):
        rk.ReversibleStack([], "midpoint")
    with pytest.raises(ValueError, match="empty"):
        rk.HamiltonianStack([], [])


def test_non_module_blocks_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        rk.ReversibleStack([lambda x: x], "midpoint")


@pytest.mark.parametrize("reversible", (True, False))
@pytest.mark.parametrize("bad", (Widen, Tupled))
def test_block_changing_shape_refused_at_first_call(bad, reversible, device):
    stack = rk.ReversibleStack([*blocks(1), bad()], "midpoint").to(device)
    stack.reversible = reversible
    x = x_in(device).requires_grad_(True)
    with pytest.raises(ValueError, match="block 1 maps shape"):
        stack(x)
    assert x.grad is None


@pytest.mark.parametrize("reversible", (True, False))
def test_hamiltonian_block_changing_shape_refused(reversible, device):
    attns, mlps = halves(2)
    stack = rk.HamiltonianStack(attns, [mlps[0], Widen()]).to(device)
    stack.reversible = reversible
    with pytest.raises(ValueError, match="maps shape"):
        stack(x_in(device))


@pytest.mark.parametrize("reversible", (True, False))
@pytest.mark.parametrize("width", (D - 1, D + 1))
def test_per_channel_a_of_wrong_width_refused(width, reversible, device):
    """(L, d') with d' != d: the unchecked kernels would read a row of the wrong width (out of bounds
    when shorter) — refused on the first call in both modes."""
    stack = rk.ReversibleStack(blocks(2), "midpoint_a", a=torch.full((2, width), 0.9)).to(device)
    stack.reversible = reversible
    with pytest.raises(ValueError, match="per-channel a must have shape"):
        stack(x_in(device))


def test_learnable_a_reaching_zero_refused(device):
    stack = rk.ReversibleStack(blocks(2), "midpoint_a", a=[0.7, -0.9], learnable_a=True).to(device)
    with torch.no_grad():
        stack.a[1] = 0.0
    with pytest.raises(ValueError, match="no longer invertible"):
        stack(x_in(device))


@pytest.mark.parametrize("x", [torch.ones(B, T, D, dtype=torch.long), "x", None])
def test_non_float_input_refused(x):
    with pytest.raises(TypeError, match="floating-point"):
        rk.ReversibleStack(blocks(1), "midpoint")(x)


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(T)),
    lambda: nn.Sequential(nn.BatchNorm2d(B)),
])
def test_batchnorm_with_running_stats_refused(make):
    """DESIGN 6: running statistics would update twice (forward and recompute)."""
    with pytest.raises(ValueError, match="running statistics"):
        rk.ReversibleStack([make()], "midpoint")
    attns, mlps = halves(1)
    with pytest.raises(ValueError, match="running statistics"):
        rk.HamiltonianStack(attns, [make()])


def test_batchnorm_without_running_stats_allowed(device):
    blk = nn.Sequential(nn.BatchNorm1d(T, track_running_stats=False), nn.Linear(D, D))
    stack = rk.ReversibleStack([blk], "midpoint").to(device)
    assert stack(x_in(device)).shape == (B, T, D)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(a=0.0), ValueError, "a = 0"),
    (dict(b=0.0), ValueError, "b = 0"),
    (dict(a=0), ValueError, "a = 0"),
    (dict(a="1"), TypeError, "a must be a float"),
    (dict(b=True), TypeError, "b must be a float"),
])
def test_bad_hamiltonian_coefficients(kwargs, err, match):
    attns, mlps = halves(2)
    with pytest.raises(err, match=match):
        rk.HamiltonianStack(attns, mlps, **kwargs)


def test_hamiltonian_mismatched_counts():
    attns, mlps = halves(3)
    with pytest.raises(ValueError, match="attn_blocks has 3 blocks but mlp_blocks has 2"):
        rk.HamiltonianStack(attns, mlps[:2])
