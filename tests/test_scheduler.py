"""The reversible backward (revkernels.scheduler) against ordinary autograd of the same forward.

Every test builds one stack and runs it twice: `reversible=True` (forward under no_grad, backward
rebuilding each state from the next two) and `reversible=False` (every activation stored, the
reference). Output, input gradient and EVERY parameter gradient must agree, at odd and even depths
(DESIGN 6: PaReprop's two-stream schedule was wrong only at odd depth), with dropout (RNG replay),
learnable / per-channel `a`, bf16 autocast and float64 states.

Error measure: for each tensor, max|rev - ref| / max|ref| (a normwise relative error; an elementwise
one would be dominated by gradient entries that happen to be near zero).

Tolerances (fp32, eps = 2^-23 = 1.19e-7). The reversible backward differs from the reference only by
the rounding of the rebuilt states, p[j-1] = (p[j+1] - (1-a_j) p[j] - c_j f_j(p[j])) / a_j, each a few
ulps of |p| per layer, which then propagates through the remaining inverse steps. The homogeneous part
of that inverse recurrence, p[j-1] = (p[j+1] - (1-a) p[j]) / a, has roots 1 and -1/a, so:
  midpoint   (a=1):  roots 1, -1: an error is carried without growth; L layers add up: K * eps * L.
  leapfrog   (a=-1): double root 1: one error grows linearly, L of them: K * eps * L^2.
  midpoint_a:        the oscillating root -1/a_j amplifies by 1/|a_j| at each layer with |a_j| < 1:
                     K * eps * L * Gamma, Gamma = prod_j max(1, 1/|a_j|) (worst channel); with all
                     |a_j| >= 1 this is midpoint's bound. Pessimistic at depth (Gamma = 27 at L=32).
  hamiltonian (a=b=1): q[l-1] = q[l] - G(p[l-1]), p[l-1] = p[l] - M(q[l]): no growth, 2 sub-steps
                     per layer: K * eps * 2L.
L is floored at 4: even at depth 1 the two runs sum gradients in different orders (a few ulps).
K = 3 for midpoint, midpoint_a and hamiltonian, 2 for leapfrog (whose L^2 is already generous).
The measured errors sit 4-90x below these bounds (each test says what it measured).

Devices: every test that runs a stack takes the `device` fixture (CPU through Triton's interpreter, and
once more with the fused ops on revkernels.fallback; CUDA with the compiled kernels, CUDA RNG replay and
CUDA autocast when a GPU is present).
Weights and inputs are drawn on the CPU from fixed seeds and moved, so both devices see the same
values. The bounds above are fp32 rounding bounds and hold for CUDA's fp32 too (the `device` fixture
keeps TF32 off); the measurements quoted were taken on the CPU. Tests of the stacks' bookkeeping
(which RNG replay 'auto' picks) and of the interpreter itself stay CPU-only.
"""
import contextlib
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too; must precede `import triton`

import pytest  # noqa: E402
import torch  # noqa: E402

import revkernels as rk  # noqa: E402
from revkernels import ops  # noqa: E402
from revkernels.replay import enabled_sdp_backends  # noqa: E402
from conftest import DEVICES_AND_FALLBACK, select_device  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
D, HEADS, T, B = 32, 4, 8, 2
SCHEMES = ("midpoint", "leapfrog", "midpoint_a")
DEPTHS = (1, 2, 3, 8, 9, 32)  # odd and even
# Step sizes that keep the states O(1)..O(10) at depth 32 (so relative errors mean something):
#  midpoint (roots +-1 of the homogeneous part) adds c*f = 2h*f per layer without growth: h = 0.5.
#  leapfrog is a discrete second derivative, p'' ~ f: states drift like (h*L)^2 |f| / 2, so h = 0.25
#    (h*L = 8; with h = 1 the states reach ~100 at depth 32 and the error ~3e-4).
#  midpoint_a's oscillating root -a_j grows whenever |a_j| > 1; a small c = h = 0.1 feeds little of
#    f into it (h = 0.5 lets states reach ~40 for some draws).
H = {"midpoint": 0.5, "leapfrog": 0.25, "midpoint_a": 0.1}


@pytest.fixture(params=DEVICES_AND_FALLBACK)
def device(request, monkeypatch):
    """CPU (the kernels under the interpreter), CUDA when there is one, and the CPU through
    revkernels.fallback, what a CPU without the interpreter runs."""
    yield from select_device(request.param, monkeypatch)


# ----------------------------------------------------------------------------- helpers

def blocks(n, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return [rk.TransformerBlock(D, HEADS, dropout=dropout) for _ in range(n)]


def three_term(scheme, depth, device, dropout=0.0, seed=0, **kw):
    """Built on the CPU (same weights and eq. 3.7 draw on every device), then moved to `device`:
    .to() moves the blocks and the coefficient buffers a, c (or the Parameter a)."""
    if scheme == "midpoint_a" and "a" not in kw:
        kw["generator"] = torch.Generator().manual_seed(seed)   # eq. 3.7 draw, reproducible
    return rk.ReversibleStack(blocks(depth, dropout, seed), scheme, h=H[scheme], **kw).to(device)


def hamiltonian(depth, device, dropout=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    attn = [rk.AttentionBlock(D, HEADS, dropout) for _ in range(depth)]
    mlp = [rk.MLPBlock(D, dropout) for _ in range(depth)]
    return rk.HamiltonianStack(attn, mlp, **kw).to(device)


def make(scheme, depth, device, **kw):
    if scheme == "hamiltonian":
        return hamiltonian(depth, device, **kw)
    return three_term(scheme, depth, device, **kw)


def inputs(device, dtype=torch.float32, seed=1):
    """(B, T, D) drawn on the CPU from `seed` (the same values on every device), moved to `device`."""
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def weights(shape, device, dtype=torch.float32, seed=7):
    """The fixed random cotangent w of the loss sum(w * y), drawn like `inputs`."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def run(stack, x, reversible, *, rng_seed=None, bf16=False):
    """Forward + backward of sum(w * stack(x)) (w fixed random, so no gradient is trivially uniform),
    on x's device; bf16 runs the forward under that device's autocast. Returns {'output', 'x.grad',
    and every parameter's name: its grad}."""
    stack.reversible = reversible
    stack.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    ac = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ac:
        y = stack(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    (y * weights(y.shape, y.device, y.dtype)).sum().backward()
    out = {"output": y.detach(), "x.grad": x.grad}
    for name, p in stack.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient (reversible={reversible})"
            out[name] = p.grad.clone()
    return out


def rel_errors(got, ref):
    """{name: max|got - ref| / max|ref|} over the same set of names."""
    assert got.keys() == ref.keys()
    errs = {}
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert torch.isfinite(g).all(), f"{name} is not finite"
        scale = r.abs().max().item()
        assert scale > 0, f"reference {name} is all zero: the comparison would be vacuous"
        errs[name] = (g - r).abs().max().item() / scale
    return errs


def assert_agree(got, ref, rtol, rtol_a=None):
    """Every tensor within rtol; the learnable coefficient `a` (if any) within rtol_a (see
    coef_rtol)."""
    errs = rel_errors(got, ref)
    for name, err in errs.items():
        tol = rtol_a if name == "a" and rtol_a is not None else rtol
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"
    return errs


def gamma(a):
    """prod_j max(1, 1/|a_j|), worst channel: how much a rebuilt-state error can grow (see top)."""
    a = a.detach().double().reshape(a.shape[0], -1)
    return torch.clamp(1 / a.abs(), min=1).prod(0).max().item()


def coef_rtol(stack, depth, x):
    """Tolerance for dL/da_j = sum(gA * (p[j-1] - p[j])): a reduction over N = B*T*d elements (B*T
    per channel) of terms each carrying the rebuilt state's rounding error (~rtol_for * |p| |gA|).
    Those errors add like a random walk, sqrt(N) times one term, while the sum itself cancels down
    to about one term (dL/da_0 is exactly 0: p[-1] = p[0]). Hence rtol_for * sqrt(N), times 4 for
    margin. Measured: <= 3.7e-5 per layer (bound >= 1.6e-4), per channel <= 6.4e-6 (bound >= 1.9e-4)."""
    n_summed = x.numel() // (x.shape[-1] if stack.a.dim() == 2 else 1)
    return 4 * math.sqrt(n_summed) * rtol_for(stack, depth)


def rtol_for(stack, depth, eps=EPS32):
    n = max(depth, 4)
    if isinstance(stack, rk.HamiltonianStack):
        return 3 * eps * 2 * n
    return {"midpoint": 3 * eps * n,
            "leapfrog": 2 * eps * n * n,
            "midpoint_a": 3 * eps * n * gamma(stack.a)}[stack.scheme]


# ----------------------------------------------------------------------------- fp32 agreement

@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("scheme", SCHEMES + ("hamiltonian",))
def test_reversible_matches_autograd(scheme, depth, device):
    # Measured (fp32, this config) max relative error over output, x.grad and all parameter grads,
    # depth 32: midpoint 1.05e-6 (bound 1.1e-5), leapfrog 9.9e-6 (bound 2.4e-4), midpoint_a 3.6e-6
    # (Gamma 27.4, bound 3.1e-4), hamiltonian 1.1e-6 (bound 2.3e-5). The outputs agree exactly.
    stack = make(scheme, depth, device)
    x = inputs(device)
    assert_agree(run(stack, x, True), run(stack, x, False), rtol_for(stack, depth))


def test_midpoint_depth_32_within_1e5(device):
    """DESIGN 4's target stated directly: midpoint gradients within 1e-5 relative at L=32 (fp32)."""
    stack = make("midpoint", 32, device, seed=3)
    x = inputs(device, seed=3)
    errs = assert_agree(run(stack, x, True), run(stack, x, False), 1e-5)
    assert len(errs) == 2 + 32 * 12   # output, x.grad and the 12 parameters of each block: all compared


def test_midpoint_a_given_list_alternating_in_sign(device):
    stack = three_term("midpoint_a", 7, device, a=[1.25, -0.8, 0.6, -1.4, 1.0, -0.55, 0.9])
    x = inputs(device)
    assert_agree(run(stack, x, True), run(stack, x, False), rtol_for(stack, 7))


@pytest.mark.parametrize("a, b, depth", [(0.8, 1.25, 7), (-1.2, 0.9, 6)])
def test_hamiltonian_non_default_coefficients(a, b, depth, device):
    """a, b != 1: the inverse divides by them, so an error can grow by max(1, 1/|a|) max(1, 1/|b|) per
    layer (Gamma = 1.25^7 = 4.8 and 1.11^6 = 1.9 here) on top of the a = b = 1 bound."""
    stack = hamiltonian(depth, device, a=a, b=b)
    x = inputs(device)
    rtol = rtol_for(stack, depth) * (max(1, 1 / abs(a)) * max(1, 1 / abs(b))) ** depth
    assert_agree(run(stack, x, True), run(stack, x, False), rtol)


def test_frozen_parameters_get_no_grad_others_agree(device):
    stack = three_term("midpoint", 3, device)
    for blk in stack.blocks[::2]:
        blk.attn.requires_grad_(False)
    x = inputs(device)
    rev, ref = run(stack, x, True), run(stack, x, False)
    frozen = [n for n, p in stack.named_parameters() if not p.requires_grad]
    assert frozen and all(stack.get_parameter(n).grad is None for n in frozen)
    assert_agree(rev, ref, rtol_for(stack, 3))


def test_stack_called_twice_in_one_graph(device):
    """y = S(S(x)): two Function nodes share the blocks; each keeps its own buffers and RNG states,
    and parameter gradients from both calls accumulate."""
    stack = three_term("leapfrog", 3, device)
    x = inputs(device)

    def twice(reversible):
        stack.reversible = reversible
        stack.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        y = stack(stack(xx))
        (y * torch.linspace(-1, 1, D, device=device)).sum().backward()
        return {"output": y.detach(), "x.grad": xx.grad,
                **{n: p.grad.clone() for n, p in stack.named_parameters()}}

    assert_agree(twice(True), twice(False), rtol_for(stack, 6))


def test_non_contiguous_input(device):
    stack = three_term("midpoint", 3, device)
    x = torch.randn(T, B, D, device=device).transpose(0, 1)          # (B, T, D) view with permuted strides
    assert not x.is_contiguous()
    assert_agree(run(stack, x, True), run(stack, x, False), rtol_for(stack, 3))


# ----------------------------------------------------------------------------- RNG replay

DROPOUT = 0.2


@pytest.mark.parametrize("depth", (4, 5))
@pytest.mark.parametrize("scheme", SCHEMES + ("hamiltonian",))
def test_dropout_replayed_in_recompute(scheme, depth, device):
    """With dropout, the reversible backward equals the reference backward under the same seed: the
    recompute replays each block's own RNG state, so it sees the forward's masks (on CUDA: the CUDA
    generator's state, which the attention's and the Dropout modules' masks are drawn from). Measured
    on CPU: <= 9.1e-7 (fp32 bound as without dropout); another seed differs by 1.4-2.2 (relative)."""
    stack = make(scheme, depth, device, dropout=DROPOUT)
    x = inputs(device)
    ref = run(stack, x, False, rng_seed=11)
    # Non-vacuous: another seed draws other masks, so outputs and gradients differ a lot.
    other = run(stack, x, False, rng_seed=12)
    assert max(rel_errors(other, ref).values()) > 0.05
    assert_agree(run(stack, x, True, rng_seed=11), ref, rtol_for(stack, depth))


@pytest.mark.parametrize("scheme", ("midpoint", "hamiltonian"))
def test_without_rng_replay_gradients_are_wrong(scheme, device):
    """preserve_rng_state=False redraws the masks in the recompute: f differs from the forward's, the
    rebuilt states and gradients are wrong (measured: relative errors 1.6-2.0). Proves the replay is
    what makes the test above pass."""
    stack = make(scheme, 5, device, dropout=DROPOUT, preserve_rng_state=False)
    x = inputs(device)
    rev, ref = run(stack, x, True, rng_seed=11), run(stack, x, False, rng_seed=11)
    errs = rel_errors(rev, ref)
    assert errs.pop("output") <= rtol_for(stack, 5)   # the forward is unaffected
    assert max(errs.values()) > 0.05


@pytest.mark.parametrize("preserve", (True, False))
def test_replay_leaves_global_rng_stream_as_reference(preserve, device):
    """The replay runs under fork_rng: after forward + backward the global generator of the device
    the masks are drawn on (CPU, or CUDA's) is where the reference leaves it (no reseeding, no extra
    draws). Without replay the recompute draws again."""
    stack = three_term("midpoint", 3, device, dropout=DROPOUT, preserve_rng_state=preserve)
    x = inputs(device)
    run(stack, x, False, rng_seed=5)
    after_ref = torch.rand(4, device=device)
    run(stack, x, True, rng_seed=5)
    after_rev = torch.rand(4, device=device)
    assert torch.equal(after_rev, after_ref) == preserve


def test_auto_rng_replay_turns_on_with_active_dropout_only():
    def replays(stack):
        return stack._run(list(stack.blocks)).preserve_rng

    noisy = make("midpoint", 2, "cpu", dropout=DROPOUT)      # bookkeeping only: CPU-only
    assert replays(noisy)
    assert not replays(make("midpoint", 2, "cpu"))
    assert not replays(noisy.eval())                # eval: dropout inactive, nothing to replay


# ----------------------------------------------------------------------------- learnable / per-channel a

@pytest.mark.parametrize("depth", (5, 8))
@pytest.mark.parametrize("per_channel", (False, True))
@pytest.mark.parametrize("learnable", (False, True))
def test_midpoint_a_coefficients(learnable, per_channel, depth, device):
    """a per layer or per channel (L, d), fixed or a Parameter whose gradient comes from the fused
    reduction dL/da_j = sum(gA * (p[j-1] - p[j])); compared with autograd through the reference."""
    gen = torch.Generator().manual_seed(4)
    a = rk.draw_midpoint_a(depth * D, gen).view(depth, D) if per_channel else rk.draw_midpoint_a(depth, gen)
    stack = three_term("midpoint_a", depth, device, a=a, learnable_a=learnable)
    assert isinstance(stack.a, torch.nn.Parameter) == learnable and stack.a.device.type == device.type
    x = inputs(device)
    rev, ref = run(stack, x, True), run(stack, x, False)
    assert ("a" in ref) == learnable
    if learnable:
        # p[-1] = p[0] = x, so dL/da_0 = sum(gA * (p[-1] - p[0])) is exactly 0; the others are not.
        assert ref["a"].shape == a.shape and (ref["a"][0] == 0).all() and (ref["a"][1:] != 0).all()
    assert_agree(rev, ref, rtol_for(stack, depth), coef_rtol(stack, depth, x))


def test_learnable_a_trains_and_stays_consistent(device):
    """Two optimiser steps on a: the reversible run keeps matching the reference with the new a."""
    stack = three_term("midpoint_a", 4, device, learnable_a=True)
    opt = torch.optim.SGD([stack.a], lr=1e-2)
    x = inputs(device)
    a0 = stack.a.detach().clone()
    for _ in range(2):
        rev, ref = run(stack, x, True), run(stack, x, False)
        assert_agree(rev, ref, rtol_for(stack, 4), coef_rtol(stack, 4, x))
        opt.step()
    assert not torch.equal(stack.a.detach(), a0)


# ----------------------------------------------------------------------------- bf16 autocast

@pytest.fixture
def hardware_bf16_rounding(monkeypatch):
    """Make Triton's interpreter round fp32 -> bf16 to nearest even, as compiled kernels do.

    Triton 3.9's interpreter lowers `x.to(tl.bfloat16)` (fp_trunc) to a plain mantissa truncation
    (InterpreterBuilder.cast_impl passes no rounding mode to _convert_float), whereas on a GPU it is
    cvt.rn.bf16.f32. The backward step stores the cotangent gf = c*gA in f's dtype (bf16 under
    autocast), so on the interpreter every gf is biased towards zero by up to one bf16 ulp and the
    three-term gradients end up ~2-2.7x further from fp32 than PyTorch's own bf16 (measured), failing
    DESIGN 5's rule for reasons of the emulator, not of the kernel. test_interpreter_truncates_bf16
    pins that behaviour down. No-op when the kernels are compiled or the reference ops run."""
    if not ops.INTERPRET:
        return
    import numpy as np
    from triton import language as tl
    from triton.runtime import interpreter

    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            bits = rounded.view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, dst_type.scalar)
        return truncating(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


def _gf_of_backward_step(device):
    gA = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(device)
    f = torch.randn(4, 64, dtype=torch.bfloat16, device=device)
    gf, _, _ = ops.backward_step_(torch.randn(4, 64, device=device), torch.randn(4, 64, device=device), f,
                                  gA.clone(), torch.zeros(4, 64, device=device), 1.0, 0.37)
    return gf, (0.37 * gA).to(torch.bfloat16)                     # kernel's, PyTorch's (nearest even)


def test_backward_step_gf_rounds_like_pytorch(device, hardware_bf16_rounding):
    """On CUDA the compiled kernel's own cvt.rn.bf16.f32; on CPU the interpreter with the fixture."""
    gf, expected = _gf_of_backward_step(device)
    assert torch.equal(gf, expected)


@pytest.mark.xfail(ops.INTERPRET, strict=True,
                   reason="Triton's interpreter truncates fp32 -> bf16 (see hardware_bf16_rounding)")
def test_interpreter_truncates_bf16():
    """Documents the emulator's rounding: strict, so it reports when Triton starts rounding (then drop
    the hardware_bf16_rounding fixture) and passes as a plain check on compiled / reference ops.
    CPU-only: it is about the interpreter (the CUDA kernel is checked by the test above)."""
    gf, expected = _gf_of_backward_step("cpu")
    assert torch.equal(gf, expected)


@pytest.mark.parametrize("depth", (3, 8, 32))
@pytest.mark.parametrize("scheme", SCHEMES + ("hamiltonian",))
def test_bf16_autocast(scheme, depth, device, hardware_bf16_rounding):
    """Blocks run in bf16 under autocast; states and gradient buffers stay fp32. FlashAttention's rule
    (DESIGN 5): |rev - ref32| <= k |ref_bf16 - ref32| + atol per tensor (max norms), ref32 the fp32
    reference without autocast, ref_bf16 the reference under autocast, k = 2. atol covers what the
    reversible run adds on top of bf16 itself, fp32 rounding of the rebuilt states: the fp32 bound.

    Measured |ref_bf16 - ref32| 0.7e-2..2e-2. Depths 3 and 8: ratio 1.000, rev16 = ref16 to <= 1.1e-6.
    Depth 32: k = 3. There the bf16 backward is chaotic at the fp32-rounding level: a cotangent that
    differs from the reference's by fp32 rounding (summation order, rebuilt states) flips some bf16
    roundings, and the gradients move by as much as bf16's own error. PyTorch's own bf16 reference on
    an input perturbed by 1e-7 relative moves by 1.1e-2 and scores 2.13 against itself; the
    reversible run scored up to 2.07 over 20 seeds x schemes (all < 2 with the seeds used here:
    1.00 / 1.53 / 1.69 / 1.78 for midpoint / leapfrog / midpoint_a / hamiltonian).
    Those numbers are CPU measurements; on CUDA the same rule (k and atol) applies to CUDA's autocast
    (cuBLAS bf16 matmuls with fp32 accumulation, SDPA's bf16 attention), ref32 and ref16 being CUDA
    runs themselves, so the bound scales with CUDA's own bf16 error."""
    stack = make(scheme, depth, device)
    x = inputs(device)
    ref32 = run(stack, x, False)
    ref16 = run(stack, x, False, bf16=True)
    rev16 = run(stack, x, True, bf16=True)
    err_rev, err_ref16 = rel_errors(rev16, ref32), rel_errors(ref16, ref32)
    # Non-vacuous: bf16 really ran (its error is ~1e-3..1e-2, far above fp32's).
    assert max(err_ref16.values()) > 1e-3
    atol, k = rtol_for(stack, depth), (2 if depth <= 8 else 3)
    for name in ref32:
        assert err_rev[name] <= k * err_ref16[name] + atol, (
            f"{name}: |rev-ref32| {err_rev[name]:.3g} > {k}*{err_ref16[name]:.3g} + {atol:.2g}")


@pytest.mark.parametrize("scheme", ("leapfrog", "hamiltonian"))
def test_bf16_recompute_uses_forward_autocast_state(scheme, device, hardware_bf16_rounding):
    """The recompute runs under the forward's autocast although backward() is called outside it, so
    the reversible run tracks the bf16 reference to fp32 rounding (measured <= 1.1e-6), not to bf16's
    ~1e-2: a recompute in fp32 would rebuild states from a different f."""
    stack = make(scheme, 4, device)
    x = inputs(device)
    ref32, ref16 = run(stack, x, False), run(stack, x, False, bf16=True)
    rev16 = run(stack, x, True, bf16=True)
    assert max(rel_errors(ref16, ref32).values()) > 1e-3
    assert_agree(rev16, ref16, 10 * rtol_for(stack, 4))


class SdpBackendSpy(torch.nn.Module):
    """A transformer block that records the SDPA backends enabled at each call."""

    def __init__(self, seen):
        super().__init__()
        self.block, self.seen = rk.TransformerBlock(D, 2), seen

    def forward(self, x):
        self.seen.append(enabled_sdp_backends())
        return self.block(x)


def test_recompute_uses_forward_sdpa_backends(device):
    """backward() outside the forward's `sdpa_kernel` context recomputes with the forward's attention
    backends (another kernel would rebuild the states from a differently rounded f), and leaves the
    caller's backends as they were."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    seen, outside = [], enabled_sdp_backends()
    stack = rk.ReversibleStack([SdpBackendSpy(seen) for _ in range(2)], h=0.5).to(device)
    x = inputs(device).requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]):
        y = stack(x)
    y.sum().backward()
    assert seen == [("MATH",)] * 4 and x.grad is not None      # two forward calls, two recomputes
    assert enabled_sdp_backends() == outside and "MATH" in outside and len(outside) > 1


# ----------------------------------------------------------------------------- float64 states

@pytest.mark.parametrize("scheme", SCHEMES + ("hamiltonian",))
def test_float64_states(scheme, device):
    """state_dtype other than fp32 (DESIGN 1 roadmap): float64 blocks and states take the reference
    formulas in ops (the kernels compute in fp32). Same error model with eps64 = 2.2e-16: bounds
    5e-15..3e-14 at depth 8, measured 1.3e-15..4.1e-15."""
    stack = make(scheme, 8, device, state_dtype=torch.float64).double()
    x = inputs(device, torch.float64)
    assert not ops.uses_triton(x)
    rev, ref = run(stack, x, True), run(stack, x, False)
    assert rev["output"].dtype == torch.float64
    errs = assert_agree(rev, ref, rtol_for(stack, 8, EPS64))
    assert max(errs.values()) < 1e-12


# ----------------------------------------------------------------------------- one backward, one recompute

@pytest.mark.parametrize("scheme", ("midpoint", "hamiltonian"))
def test_second_backward_refused(scheme, device):
    """The backward rebuilds states inside the saved buffers; a second pass (retain_graph) would read
    overwritten ones, so it must refuse instead of returning wrong gradients."""
    stack = make(scheme, 3, device)
    x = inputs(device)
    ref = run(stack, x, False)
    stack.reversible = True
    stack.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    y = stack(xx)
    w = weights(y.shape, device)
    (y * w).sum().backward(retain_graph=True)
    first = {"output": y.detach(), "x.grad": xx.grad.clone(),
             **{n: p.grad.clone() for n, p in stack.named_parameters()}}
    assert_agree(first, ref, rtol_for(stack, 3))      # the first (retained) pass is still right
    with pytest.raises(RuntimeError, match="once"):
        (y * w).sum().backward()
    with pytest.raises(RuntimeError, match="once"):
        torch.autograd.grad(y.sum(), xx)


def test_double_backward_refused(device):
    """Gradients of gradients are not supported: create_graph gives a graph that says so."""
    stack = make("midpoint", 2, device)
    xx = inputs(device).clone().requires_grad_(True)
    (g,) = torch.autograd.grad(stack(xx).pow(2).sum(), xx, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


@pytest.mark.parametrize("scheme", ("leapfrog", "hamiltonian"))
def test_each_block_recomputed_exactly_once(scheme, device):
    stack = make(scheme, 5, device)
    mods = list(stack.blocks) if scheme != "hamiltonian" else [*stack.attn_blocks, *stack.mlp_blocks]
    calls = {id(m): 0 for m in mods}
    for m in mods:
        m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls[id(mod)] + 1))
    x = inputs(device).requires_grad_(True)
    stack.reversible = False
    stack(x).sum().backward()
    assert set(calls.values()) == {1}
    stack.reversible = True
    y = stack(x)
    assert set(calls.values()) == {2}
    y.sum().backward()
    assert set(calls.values()) == {3}                  # forward once, recompute once per block
