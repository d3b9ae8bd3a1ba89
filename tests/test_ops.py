"""The fused ops (revkernels.ops) against revkernels.reference and exact float64 math.

On a CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), on CUDA
compiled; fresh buffers are NaN-filled (conftest), so an element a kernel forgets to write fails.

Error bounds (NUMERICS). u = 2^-24 is the fp32 unit roundoff; one fp32 operation on operands
s, t returns (s op t)(1 + e) with |e| <= u. Kernels and reference both compute in fp32 but may
differ in the order and fusion of the roundings: a GPU may contract a*x + y into one FMA, and with a
Python-float `a` the reference forms 1 - a in float64 and rounds it once, the kernel rounds `a` to
fp32 first and then 1 - a. A fixed rtol cannot describe that: the rounding error scales with the
*terms* being added, not with the result (which can cancel). So every bound below is elementwise,
k * u * (sum of the magnitudes of the terms), first order in u, derived per implementation against
the exact float64 value; two implementations then differ by at most twice that:

  step     z = a x + (1-a) y + c f,  T = |a||x| + (|a| + |1-a|)|y| + |c||f|
           a x: rounding of a, product, two additions -> 4u|a x|; (1-a) y: rounding of a (u|a||y|),
           the subtraction 1-a, product, two additions -> 4u(|a| + |1-a|)|y|; c f: 3u|c f|.
           |z_impl - z| <= 4 u T.
  inverse  x = (z - (1-a) y - c f) / a,  T' = |z| + (|a| + |1-a|)|y| + |c||f|
           numerator: at most 4 roundings per term as above -> 4 u T'; the division and the rounding
           of a add 2u|x|:  |x_impl - x| <= 4 u T' / |a| + 2 u |x|.
  coupling z = alpha x + g: 3u(|alpha||x| + |g|);  x = (z - g)/alpha: u(|z| + |g|)/|alpha| + 2u|x|.

Round trip inverse(step(x)): the step leaves an absolute error E1 <= 4uT in z; the inverse sees it
undivided in its numerator, adds its own E2 <= 4uT' <= 8uT (|z| <= T), and divides the sum by a:
    |x' - x| <= (E1 + E2)/|a| + 2u|x| <= 12 u T / |a| + 2 u |x|.                   (ROUND TRIP)
The 1/|a| is real: the measured error / (u T/|a|) stays ~1-2 for every a, so it grows as a -> 0
(test_round_trip_error_grows_like_inverse_a), and a bound without it fails from a = 0.1 on.
For the coupling: |x' - x| <= 4 u (|alpha||x| + |g|) / |alpha| + 2 u |x|.

Reductions (dL/da, dL/dc): the kernel sums a tile of rows, the host sums the tiles (and the
channels for a scalar coefficient); torch.sum sums in its own order. Any order of summing n terms
t_i errs by at most (n-1) u sum|t_i| (Higham, Accuracy and Stability, eq. 4.4). Each term has one
or two roundings of its own (product, subtraction A_new - B) and, for dL/da, carries the error of
A_new times |gA|. So, per implementation,
    |da_impl - da| <= (n+1) u sum|gA (A_new - B)| + sum |gA| * err(A_new),    |dc_impl - dc| <= n u sum|gA f|.
This is what kernel vs reference is held to (twice it). Against the exact sum the kernel is also held
to the depth of its own reduction tree instead of n - 1: (BLOCK_M - 1) rows in a tile, then the tile
partials (and the channels, for a scalar coefficient) in one torch.sum, i.e. a few hundred, not n.

Low-precision stores (gf in f's dtype): DESIGN section 5 takes FlashAttention's rule, "twice
PyTorch's own error": PyTorch rounds to nearest (error <= u_low |v|), so we allow 2 u_low |v| on
top of the fp32 error, plus one subnormal spacing of the low dtype as the rule's atol (fp16 values
below 6e-5 are subnormal: no relative bound there). The factor 2 is needed on a CPU: Triton 3.9's
interpreter casts fp32 -> bf16 by truncation (round toward zero, error < 1 ulp = 2 u_low |v|);
compiled Triton rounds to nearest even (see also test_scheduler's hardware_bf16_rounding).
"""
import math

import pytest
import torch

import revkernels as rk
from conftest import DEVICES, DEVICES_AND_FALLBACK, select_device
from revkernels import ops, tiles
from revkernels import reference as ref

U = 2.0 ** -24
U_LOW = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}

# Larger than an interpreter tile: more rows than any BLOCK_M and a last dim > MAX_BLOCK_D, so several
# programs run on both grid axes, with partial tiles on both (test_big_shapes_span_several_programs).
_BIG_M = max(tiles.INTERPRETER_TILE_ELEMS.values()) // tiles.MAX_BLOCK_D + 5
_BIG_D = tiles.MAX_BLOCK_D + 44
BIG = (_BIG_M, _BIG_D)
LAYOUT_SHAPE = (3, -(-_BIG_M // 3), _BIG_D)  # the same as (batch, seq, d), for the layout tests
SHAPES = [(), (1,), (1, 1, 1), (0, 8), (3, 17, 40), BIG]
F_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
COEF_PAIRS = [("float", "float"), ("0d", "0d"), ("channel", "channel"), ("float", "channel"), ("channel", "0d")]

WORST = {}  # largest err / bound seen per quantity (for reporting; the asserts are what count)


@pytest.fixture(params=DEVICES_AND_FALLBACK)
def device(request, monkeypatch):
    """The kernels on the CPU (interpreter) and on CUDA when there is one, and revkernels.fallback."""
    yield from select_device(request.param, monkeypatch)


def matrix(pairs):
    """(shape, coefficient kinds, dtype of f / g) params: every shape with every kind of coefficient
    for an fp32 f, and with the first and last kinds for bf16 / fp16 f (the load casts do not depend on
    the coefficients; this keeps the interpreter run short). A 0-d state has no per-channel case."""
    return [pytest.param(s, k, dt, id=f"{s}-{'-'.join(k)}-{str(dt)[6:]}")
            for dt in F_DTYPES for s in SHAPES
            for k in (pairs if dt == torch.float32 else (pairs[0], pairs[-1]))
            if len(s) or "channel" not in k]


# ------------------------------------------------------------------ helpers

def d64(v):
    """Tensor or Python number -> float64 CPU tensor (per-channel coefficients broadcast on the last dim)."""
    return v.detach().double().cpu() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)


def assert_within(actual, expected, bound, what):
    """Elementwise |actual - expected| <= bound; NaN anywhere fails."""
    actual, expected = d64(actual), d64(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual - expected).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    ok = err <= bound
    if err.numel():
        ratio = torch.where(bound > 0, err / bound, torch.where(err > 0, torch.inf, 0.0)).max().item()
        WORST[what] = max(WORST.get(what, 0.0), ratio)
    assert bool(ok.all()), (f"{what}: {int((~ok).sum())}/{err.numel()} elements beyond the bound, "
                            f"max err {err.max().item():.3e}, max err/bound {WORST.get(what)}")


def lowp_err(v, dtype):
    """Bound on rounding the fp32 value v to `dtype`, to nearest or toward zero: 2 u_low |v|, plus one
    subnormal spacing of `dtype` (relative error is unbounded there: fp16 below 6e-5): the rule's atol."""
    if dtype in (torch.float32, torch.float64):
        return torch.zeros_like(v)
    fi = torch.finfo(dtype)
    return 2 * U_LOW[dtype] * v.abs() + fi.tiny * fi.eps


def make_coef(kind, role, d, device):
    """A coefficient of the given kind. `a` stays away from 0 (|a| >= 0.25: the inverses divide by it)."""
    if kind == "float":
        return {"a": 0.7, "c": 0.3}[role]          # neither is exact in fp32
    if kind == "0d":
        return torch.tensor({"a": -1.3, "c": -0.45}[role], device=device)
    if role == "a":
        sign = torch.where(torch.rand(d) < 0.5, -1.0, 1.0)
        return (sign * (0.25 + 1.25 * torch.rand(d))).to(device)
    return torch.randn(d, device=device)


def last_dim(shape):
    return shape[-1] if len(shape) else 1


def coef_pair(kinds, shape, device):
    if len(shape) == 0 and "channel" in kinds:
        pytest.skip("a 0-d state has no channel dim")
    d = last_dim(shape)
    return make_coef(kinds[0], "a", d, device), make_coef(kinds[1], "c", d, device)


def step_err(x, y, f, a, c):
    """Bound on |step_impl - exact| (NUMERICS, step)."""
    a, c = d64(a), d64(c)
    return 4 * U * (a.abs() * d64(x).abs() + (a.abs() + (1 - a).abs()) * d64(y).abs() + c.abs() * d64(f).abs())


def inverse_err(z, y, f, a, c, res):
    """Bound on |inverse_impl - exact| (NUMERICS, inverse); res = the (reference) result."""
    a, c = d64(a), d64(c)
    T = d64(z).abs() + (a.abs() + (1 - a).abs()) * d64(y).abs() + c.abs() * d64(f).abs()
    return 4 * U * T / a.abs() + 2 * U * d64(res).abs()


def round_trip_bound(x, y, f, a, c):
    """NUMERICS, ROUND TRIP: 12 u T / |a| + 2 u |x|."""
    return 3 * step_err(x, y, f, a, c) / d64(a).abs() + 2 * U * d64(x).abs()


def reduce_like(t, coef):
    """Sum over every dim but the last for a per-channel coefficient, over everything otherwise."""
    if isinstance(coef, torch.Tensor) and coef.dim() == 1:
        return t.reshape(-1, t.shape[-1]).sum(0)
    return t.sum()


def kernel_sum_depth(t, coef, f_dtype):
    """Additions any one term goes through in the last fused backward's reduction: a tile's BLOCK_M rows
    in the kernel (tl.sum), then torch over the grid[0] tile partials (over those and the D channels at
    once for a scalar coefficient). On the reference path: torch.sum over all n terms."""
    per_channel = isinstance(coef, torch.Tensor) and coef.dim() == 1
    if not ops.uses_triton(t) or t.numel() == 0:
        return n_summed(t, coef) - 1
    D = last_dim(t.shape)
    tile = ops.tuned_config("rev_backward_step+coef_grads", D, f_dtype)
    rows = tiles.grid(t.numel() // D, D, tile)[0]
    return (tile["BLOCK_M"] - 1) + (rows - 1 if per_channel else rows * D - 1)


def n_summed(t, coef):
    per_channel = isinstance(coef, torch.Tensor) and coef.dim() == 1
    return max(1, t.numel() // last_dim(t.shape) if per_channel else t.numel())


def rand(shape, device, dtype=torch.float32):
    return torch.randn(shape, device=device).to(dtype)


def clones(*ts):
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in ts]


def assert_unchanged(before, after):
    for b, a in zip(before, after):
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b), "an input of a functional call was modified"


# ------------------------------------------------------------------ set-up checks

def test_nan_fill_guard_is_active():
    assert torch.empty(4).isnan().all() and torch.empty_like(torch.zeros(3)).isnan().all()
    assert torch.zeros(2).new_empty(3).isnan().all()
    assert torch.empty(3, dtype=torch.int64).dtype == torch.int64  # integer allocations still work


@pytest.mark.parametrize("shape", [BIG, LAYOUT_SHAPE], ids=str)
@pytest.mark.parametrize("family", ["three_term", "coupling", "backward_step"])
def test_big_shapes_span_several_programs(family, shape):
    """Under the interpreter (CPU); on a GPU the autotuner picks the tiles."""
    D = shape[-1]
    M = math.prod(shape[:-1])
    grid = tiles.grid(M, D, tiles.interpreter_tile(family, M, D, 4).kwargs)
    assert grid[0] > 1 and grid[1] > 1, grid


def test_guard_catches_a_kernel_that_skips_a_tile(monkeypatch):
    """The tests can fail: launched with one row of programs too few, the NaN of the fresh buffer shows."""
    if not (ops.HAS_TRITON and ops.uses_triton(torch.zeros(1))):
        pytest.skip("kernels do not run on this machine's CPU")
    grid = tiles.grid
    monkeypatch.setattr(tiles, "grid", lambda M, D, meta: (lambda g: (g[0] - 1, g[1]))(grid(M, D, meta)))
    x, y, f = (rand(BIG, "cpu") for _ in range(3))
    assert rk.rev_step(x, y, f, 0.5, 0.5).isnan().any()
    gf, _, _ = rk.rev_backward_step(x.clone(), y, f, x.clone(), y.clone(), 0.5, 0.5)
    assert gf.isnan().any()


# ------------------------------------------------------------------ forward ops vs reference

@pytest.mark.parametrize("shape, kinds, f_dtype", matrix(COEF_PAIRS))
@pytest.mark.parametrize("inverse", [False, True], ids=["rev_step", "rev_inverse"])
def test_three_term_matches_reference(device, inverse, shape, f_dtype, kinds):
    a, c = coef_pair(kinds, shape, device)
    x, y = rand(shape, device), rand(shape, device)
    f = rand(shape, device, f_dtype)
    before = clones(x, y, f, a, c)
    op, ref_op = (rk.rev_inverse, ref.rev_inverse) if inverse else (rk.rev_step, ref.rev_step)

    out = op(x, y, f, a, c)

    assert out.dtype == torch.float32 and out.shape == x.shape and out.device == x.device
    expected = ref_op(x, y, f, a, c)
    a64, c64 = d64(a), d64(c)
    if inverse:
        exact = (d64(x) - (1 - a64) * d64(y) - c64 * d64(f)) / a64
        err = inverse_err(x, y, f, a, c, exact)
    else:
        exact = a64 * d64(x) + (1 - a64) * d64(y) + c64 * d64(f)
        err = step_err(x, y, f, a, c)
    name = "rev_inverse" if inverse else "rev_step"
    assert_within(out, expected, 2 * err, f"{name} vs reference")
    assert_within(out, exact, err, f"{name} vs exact")
    assert_unchanged(before, [x, y, f, a, c])


@pytest.mark.parametrize("shape, kinds, g_dtype", matrix([("float",), ("0d",), ("channel",)]))
@pytest.mark.parametrize("inverse", [False, True], ids=["coupling_step", "coupling_inverse"])
def test_coupling_matches_reference(device, inverse, shape, g_dtype, kinds):
    alpha, _ = coef_pair(kinds + ("float",), shape, device)
    x, g = rand(shape, device), rand(shape, device, g_dtype)
    before = clones(x, g, alpha)
    op, ref_op = (rk.coupling_inverse, ref.coupling_inverse) if inverse else (rk.coupling_step, ref.coupling_step)

    out = op(x, g, alpha)

    assert out.dtype == torch.float32 and out.shape == x.shape
    al = d64(alpha)
    if inverse:
        exact = (d64(x) - d64(g)) / al
        err = U * (d64(x).abs() + d64(g).abs()) / al.abs() + 2 * U * exact.abs()
    else:
        exact = al * d64(x) + d64(g)
        err = 3 * U * (al.abs() * d64(x).abs() + d64(g).abs())
    name = "coupling_inverse" if inverse else "coupling_step"
    assert_within(out, ref_op(x, g, alpha), 2 * err, f"{name} vs reference")
    assert_within(out, exact, err, f"{name} vs exact")
    assert_unchanged(before, [x, g, alpha])


# ------------------------------------------------------------------ fused backward steps

def backward_step_bounds(A, B, f, gA, gB, a, c, ref_out):
    """Per-implementation bounds (NUMERICS) on A_new, gA_new, gB_new, gf, da, dc."""
    A_new = d64(ref_out[0])
    a64, c64, g = d64(a), d64(c), d64(gA)
    eA = inverse_err(A, B, f, a, c, A_new)
    e_gA = 2 * U * (a64 * g).abs()
    e_gB = 3 * U * (d64(gB).abs() + (a64.abs() + (1 - a64).abs()) * g.abs())
    e_gf = 2 * U * (c64 * g).abs() + lowp_err(c64 * g, f.dtype)
    ta, tc = (g * (A_new - d64(B))).abs(), (g * d64(f)).abs()
    e_da = (n_summed(A, a) + 1) * U * reduce_like(ta, a) + reduce_like(g.abs() * eA, a)
    e_dc = n_summed(A, c) * U * reduce_like(tc, c)
    return eA, e_gA, e_gB, e_gf, e_da, e_dc


@pytest.mark.parametrize("shape, kinds, f_dtype", matrix(COEF_PAIRS))
def test_backward_step_matches_reference(device, shape, f_dtype, kinds):
    a, c = coef_pair(kinds, shape, device)
    A, B, gA, gB = (rand(shape, device) for _ in range(4))
    f = rand(shape, device, f_dtype)
    A0, B0, f0, gA0, gB0 = clones(A, B, f, gA, gB)

    gf, da, dc = rk.rev_backward_step(A, B, f, gA, gB, a, c, coef_grads=True)

    expected = ref.rev_backward_step(A0, B0, f0, gA0, gB0, a, c, coef_grads=True)
    eA, e_gA, e_gB, e_gf, e_da, e_dc = backward_step_bounds(A0, B0, f0, gA0, gB0, a, c, expected)
    assert gf.dtype == f_dtype and gf.shape == shape and gf.device == A.device
    for got, name in ((da, "a"), (dc, "c")):
        coef = a if name == "a" else c
        per_channel = isinstance(coef, torch.Tensor) and coef.dim() == 1
        assert got.dtype == torch.float32 and got.shape == ((last_dim(shape),) if per_channel else ())
    assert_within(A, expected[0], 2 * eA, "backward A_new vs reference")
    assert_within(gA, expected[1], 2 * e_gA, "backward gA vs reference")
    assert_within(gB, expected[2], 2 * e_gB, "backward gB vs reference")
    assert_within(gf, expected[3], 2 * e_gf, "backward gf vs reference")
    assert_within(gf, d64(c) * d64(gA0), e_gf, "backward gf vs exact")
    assert_within(da, expected[4], 2 * e_da, "backward dL/da vs reference")
    assert_within(dc, expected[5], 2 * e_dc, "backward dL/dc vs reference")
    # Tighter, against the exact sums: the kernel's own summation depth instead of n (NUMERICS).
    g = d64(gA0)
    A_exact = (d64(A0) - (1 - d64(a)) * d64(B0) - d64(c) * d64(f0)) / d64(a)
    depth_a, depth_c = kernel_sum_depth(A0, a, f_dtype), kernel_sum_depth(A0, c, f_dtype)
    ta, tc = g * (A_exact - d64(B0)), g * d64(f0)
    assert_within(da, reduce_like(ta, a), (depth_a + 2) * U * reduce_like(ta.abs(), a) + reduce_like(g.abs() * eA, a),
                  "backward dL/da vs exact (summation depth)")
    assert_within(dc, reduce_like(tc, c), (depth_c + 1) * U * reduce_like(tc.abs(), c),
                  "backward dL/dc vs exact (summation depth)")
    assert torch.equal(B, B0) and torch.equal(f, f0)  # read-only operands


@pytest.mark.parametrize("kinds", [("float", "float"), ("0d", "channel")], ids="-".join)
def test_backward_step_without_coef_grads(device, kinds):
    shape = (3, 17, 40)
    a, c = coef_pair(kinds, shape, device)
    A, B, gA, gB = (rand(shape, device) for _ in range(4))
    f = rand(shape, device, torch.bfloat16)
    expected = ref.rev_backward_step(A, B, f, gA, gB, a, c)
    eA, e_gA, e_gB, e_gf, _, _ = backward_step_bounds(A, B, f, gA, gB, a, c, expected)
    gf, da, dc = rk.rev_backward_step(A, B, f, gA, gB, a, c)
    assert da is None and dc is None and gf.dtype == torch.bfloat16
    for got, want, e, name in ((A, expected[0], eA, "A"), (gA, expected[1], e_gA, "gA"),
                               (gB, expected[2], e_gB, "gB"), (gf, expected[3], e_gf, "gf")):
        assert_within(got, want, 2 * e, f"backward {name} vs reference")


# ------------------------------------------------------------------ g_pending: gA + J^T gf folded in

G_PENDING_CASES = [pytest.param(s, dt, k, id=f"{s}-{str(dt)[6:]}-{'-'.join(k)}")
                   for s in [(3, 17, 40), (5, 100)] for dt in (torch.float32, torch.bfloat16)
                   for k in (("float", "float"), ("channel", "0d"))]
G_PENDING_CASES.append(pytest.param(BIG, torch.bfloat16, ("channel", "0d"), id="big"))


@pytest.mark.parametrize("shape, f_dtype, kinds", G_PENDING_CASES)
def test_backward_step_with_g_pending(device, shape, f_dtype, kinds):
    """g_pending is added to gA in fp32 inside the kernel: every output is bit-identical to calling
    with gA + g_pending summed beforehand (the separate pass it replaces), and within the reference's
    bounds for that sum (the reference takes g_pending too)."""
    a, c = coef_pair(kinds, shape, device)
    A, B, gA, gB, gp = (rand(shape, device) for _ in range(5))
    f = rand(shape, device, f_dtype)
    A0, B0, f0, gA0, gB0, gp0 = clones(A, B, f, gA, gB, gp)
    A2, gB2, g_sum = A.clone(), gB.clone(), gA + gp

    gf, da, dc = rk.rev_backward_step(A, B, f, gA, gB, a, c, coef_grads=True, g_pending=gp)
    gf2, da2, dc2 = rk.rev_backward_step(A2, B, f, g_sum, gB2, a, c, coef_grads=True)

    for got, want, name in ((A, A2, "A"), (gA, g_sum, "gA"), (gB, gB2, "gB"), (gf, gf2, "gf"),
                            (da, da2, "dL/da"), (dc, dc2, "dL/dc")):
        assert torch.equal(got, want), f"{name} with g_pending differs from the pre-summed gA"
    expected = ref.rev_backward_step(A0, B0, f0, gA0, gB0, a, c, coef_grads=True, g_pending=gp0)
    eA, e_gA, e_gB, e_gf, e_da, e_dc = backward_step_bounds(A0, B0, f0, gA0 + gp0, gB0, a, c, expected)
    for got, want, e, name in ((A, expected[0], eA, "A"), (gA, expected[1], e_gA, "gA"),
                               (gB, expected[2], e_gB, "gB"), (gf, expected[3], e_gf, "gf"),
                               (da, expected[4], e_da, "dL/da"), (dc, expected[5], e_dc, "dL/dc")):
        assert_within(got, want, 2 * e, f"backward {name} with g_pending vs reference")
    # Against float64: three roundings (the sum, a to fp32, the product), first order in u; 4u covers
    # the second-order terms.
    g64 = d64(gA0) + d64(gp0)
    assert_within(gA, d64(a) * g64, 4 * U * (d64(a) * g64).abs(), "backward gA with g_pending vs exact")
    assert torch.equal(gp, gp0) and torch.equal(B, B0) and torch.equal(f, f0)  # read-only operands


def test_reference_g_pending_is_gA_plus_g_pending():
    shape = (4, 24)
    A, B, gA, gB, gp = (rand(shape, "cpu").double() for _ in range(5))
    a = make_coef("channel", "a", 24, "cpu").double()
    got = ref.rev_backward_step(A, B, B, gA, gB, a, 0.3, True, gp)
    want = ref.rev_backward_step(A, B, B, gA + gp, gB, a, 0.3, True)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ------------------------------------------------------------------ autotuning: in-place updates once

@pytest.mark.parametrize("device", DEVICES)
def test_autotuning_applies_in_place_updates_once(device, monkeypatch):
    """Tuning times several tiles on the real arguments: each timed launch of an in-place op must be
    undone (restore_value), so the result is one application, equal to an untuned launch. On a CPU
    through the autotuner under the interpreter; on CUDA with the compiled candidates."""
    if device == "cpu" and not (ops.HAS_TRITON and ops.uses_triton(torch.zeros(1))):
        pytest.skip("kernels do not run on this machine's CPU")
    monkeypatch.setattr(tiles, "TUNE_UNDER_INTERPRETER", True)
    monkeypatch.setattr(tiles, "AUTOTUNE", True)
    monkeypatch.setattr(tiles, "_TUNERS", {})
    monkeypatch.setattr(tiles, "COEF_GRADS_VECTORS_PER_THREAD", (1, 4))  # two tiles to time here too
    shape = (2, 3, 40)  # one or two programs per launch: the interpreter is slow per program
    x, y, gA, gB, gp = (rand(shape, device) for _ in range(5))
    f = rand(shape, device, torch.bfloat16)
    a = make_coef("channel", "a", 40, device)
    want_step = ref.rev_step(x, y, f, a, 0.3)
    want_back = ref.rev_backward_step(x, y, f, gA, gB, a, 0.3, True, gp)

    buf = x.clone()
    rk.rev_step(buf, y, f, a, 0.3, out=buf)
    A, gA_, gB_ = x.clone(), gA.clone(), gB.clone()
    gf, da, dc = rk.rev_backward_step(A, y, f, gA_, gB_, a, 0.3, coef_grads=True, g_pending=gp)

    for family in ("three_term", "backward_step"):
        assert len(tiles._TUNERS[family].configs_timings) > 1, "the autotuner timed a single tile"
    tile = ops.tuned_config("rev_backward_step+coef_grads", 40, torch.bfloat16)
    assert tile["tuned"] and tiles._TUNERS["backward_step"].best_config.kwargs["BLOCK_M"] == tile["BLOCK_M"]
    assert_within(buf, want_step, 2 * step_err(x, y, f, a, 0.3), "tuned in-place rev_step")
    bounds = backward_step_bounds(x, y, f, gA + gp, gB, a, 0.3, want_back)
    for got, want, e, name in zip((A, gA_, gB_, gf, da, dc), want_back, bounds, ("A", "gA", "gB", "gf", "da", "dc")):
        assert_within(got, want, 2 * e, f"tuned backward {name}")


@pytest.mark.parametrize("kind", ["float", "0d", "channel"])
@pytest.mark.parametrize("f_dtype", F_DTYPES, ids=str)
def test_backward_step_matches_autograd(device, kind, f_dtype):
    """The fused backward is the vjp of the step: compare with float64 autograd of
    p_next = a p_prev + (1-a) p_cur + c f, fed gA = dL/dp_next (coefficients learnable)."""
    shape = (4, 9, 24)
    d = shape[-1]
    x, B, gA, gB = (rand(shape, device) for _ in range(4))
    f = rand(shape, device, f_dtype)
    a = make_coef(kind, "a", d, device)
    c = make_coef(kind, "c", d, device)
    leaves = [d64(t).requires_grad_() for t in (x, B, f, a, c)]
    x64, B64, f64, a64, c64 = leaves
    z = a64 * x64 + (1 - a64) * B64 + c64 * f64
    z.backward(d64(gA))

    A = z.detach().float().to(device)  # p_next in the fp32 buffer (one more rounding: u|z| <= uT)
    gA0, gB0 = gA.clone(), gB.clone()
    gf, da, dc = rk.rev_backward_step(A, B, f, gA, gB, a, c, coef_grads=True)

    g = d64(gA0)
    rt = round_trip_bound(x, B, f, a, c)
    assert_within(A, x64.detach(), rt, "backward A_new vs autograd p_prev")
    assert_within(gA, x64.grad, 2 * U * (d64(a) * g).abs(), "backward gA vs autograd")
    a_abs = d64(a).abs()
    assert_within(gB, d64(gB0) + B64.grad,
                  3 * U * (d64(gB0).abs() + (a_abs + (1 - d64(a)).abs()) * g.abs()), "backward gB vs autograd")
    assert_within(gf, f64.grad, 2 * U * (d64(c) * g).abs() + lowp_err(d64(c) * g, f_dtype), "backward gf vs autograd")
    ta = (g * (x64.detach() - B64.detach())).abs()
    n = n_summed(x, a)
    assert_within(da, a64.grad.reshape(da.shape), (n + 1) * U * reduce_like(ta, a) + reduce_like(g.abs() * rt, a),
                  "backward dL/da vs autograd")
    assert_within(dc, c64.grad.reshape(dc.shape), n * U * reduce_like((g * f64.detach()).abs(), c),
                  "backward dL/dc vs autograd")


@pytest.mark.parametrize("gx_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, kinds", [p.values[:2] for p in matrix([("float",), ("0d",), ("channel",)])
                                           if p.values[2] == torch.float32])
def test_coupling_backward_step(device, shape, kinds, gx_dtype):
    alpha, _ = coef_pair(kinds + ("float",), shape, device)
    x, g = rand(shape, device), rand(shape, device, torch.bfloat16)
    gx = rand(shape, device, gx_dtype)
    x0, g0, gx0 = clones(x, g, gx)

    res = rk.coupling_backward_step(x, g, gx, alpha)

    assert res is x
    al = d64(alpha)
    x_exp = (d64(x0) - d64(g0)) / al
    e_x = U * (d64(x0).abs() + d64(g0).abs()) / al.abs() + 2 * U * x_exp.abs()
    assert_within(x, ref.coupling_inverse(x0, g0, alpha), 2 * e_x, "coupling_backward x vs reference")
    assert_within(x, x_exp, e_x, "coupling_backward x vs exact")
    e_gx = 2 * U * (al * d64(gx0)).abs() + lowp_err(al * d64(gx0), gx_dtype)
    assert_within(gx, al * d64(gx0), e_gx, "coupling_backward gx vs exact")
    assert torch.equal(g, g0)


# ------------------------------------------------------------------ round trips

ROUND_TRIP_A = [1, -1, 0.5, 0.1, "0d", "channel"]


def round_trip_coef(a, d, device):
    if a == "0d":
        return torch.tensor(-0.3, device=device)
    if a == "channel":
        return make_coef("channel", "a", d, device)
    return a


@pytest.mark.parametrize("shape", [(3, 17, 40), BIG], ids=str)
@pytest.mark.parametrize("f_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("a", ROUND_TRIP_A, ids=str)
def test_rev_round_trip(device, a, f_dtype, shape):
    a = round_trip_coef(a, shape[-1], device)
    c = make_coef("channel", "c", shape[-1], device) if isinstance(a, torch.Tensor) else 0.3
    x, y = rand(shape, device), 3 * rand(shape, device)
    f = rand(shape, device, f_dtype)
    x_back = rk.rev_inverse(rk.rev_step(x, y, f, a, c), y, f, a, c)
    assert_within(x_back, x, round_trip_bound(x, y, f, a, c), "rev round trip")


@pytest.mark.parametrize("shape", [(3, 17, 40), BIG], ids=str)
@pytest.mark.parametrize("alpha", ROUND_TRIP_A, ids=str)
def test_coupling_round_trip(device, alpha, shape):
    alpha = round_trip_coef(alpha, shape[-1], device)
    x, g = rand(shape, device), 3 * rand(shape, device, torch.bfloat16)
    x_back = rk.coupling_inverse(rk.coupling_step(x, g, alpha), g, alpha)
    al = d64(alpha).abs()
    bound = 4 * U * (al * d64(x).abs() + d64(g).abs()) / al + 2 * U * d64(x).abs()
    assert_within(x_back, x, bound, "coupling round trip")


def test_round_trip_error_grows_like_inverse_a(device):
    """The 1/|a| of the bound is needed: for small a the error exceeds the bound without it (but
    never the bound with it), i.e. inversion drift grows like 1/|a| (DESIGN section 6)."""
    shape = (3, 17, 40)
    x, y, f = (rand(shape, device) for _ in range(3))
    for a in (1e-2, 1e-3):
        x_back = rk.rev_inverse(rk.rev_step(x, y, f, a, 0.3), y, f, a, 0.3)
        err = (d64(x_back) - d64(x)).abs()
        with_div = round_trip_bound(x, y, f, a, 0.3)                      # 12uT/|a| + 2u|x|
        without_div = 3 * step_err(x, y, f, a, 0.3) + 2 * U * d64(x).abs()  # 12uT + 2u|x|
        assert bool((err <= with_div).all())
        assert bool((err > without_div).any()), a


# ------------------------------------------------------------------ layouts, in place, coefficient dtypes

LAYOUTS = ["contiguous", "transposed", "strided", "rows", "offset"]


def relayout(t, kind):
    """(view, base): `view` has t's values in the given memory layout inside `base`; base's other
    elements are NaN, so a kernel reading them poisons its result, and writing them shows."""
    nan = float("nan")
    if kind == "contiguous":
        v = t.clone()
        return v, v
    if kind == "transposed":  # no (M, D) view exists: the launcher takes its copy path
        base = t.transpose(-1, -2).contiguous()
        return base.transpose(-1, -2), base
    if kind == "strided":  # every other channel: stride 2 along D
        base = torch.full(t.shape[:-1] + (2 * t.shape[-1],), nan, dtype=t.dtype, device=t.device)
        v = base[..., ::2]
    elif kind == "rows":  # every other row: an (M, D) view with stride_m = 2 D
        base = torch.full((t.shape[0], 2 * t.shape[1], t.shape[2]), nan, dtype=t.dtype, device=t.device)
        v = base[:, ::2]
    else:  # "offset": a storage offset, contiguous otherwise
        base = torch.full((t.numel() + 3,), nan, dtype=t.dtype, device=t.device)
        v = base[3:].view(t.shape)
    v.copy_(t)
    return v, base


def assert_base_intact(view, base):
    """The op wrote every element of `view` (no NaN left) and nothing of `base` outside it."""
    assert not view.isnan().any()
    assert int(base.isnan().sum()) == base.numel() - view.numel()


OPS = ["rev_step", "rev_inverse", "rev_backward_step", "coupling_step", "coupling_inverse",
       "coupling_backward_step"]


def run_op(name, bufs, a, c):
    """Run op `name` on buffers (in the op's argument order, `out` last where it has one)."""
    fn = getattr(rk, name)
    if name in ("rev_step", "rev_inverse"):
        return fn(*bufs[:3], a, c, out=bufs[3])
    if name == "rev_backward_step":
        return fn(*bufs, a, c, coef_grads=True)
    if name in ("coupling_step", "coupling_inverse"):
        return fn(*bufs[:2], a, out=bufs[2])
    return fn(*bufs, a)


def expected_of(name, bufs, a, c):
    """Reference results for `run_op` on contiguous copies, with their (between-implementations) bounds,
    as a list of (index of the buffer holding the result, value, bound) plus extra returned values."""
    if name in ("rev_step", "rev_inverse"):
        x, y, f = bufs[:3]
        if name == "rev_step":
            return [(3, ref.rev_step(x, y, f, a, c), 2 * step_err(x, y, f, a, c))]
        r = ref.rev_inverse(x, y, f, a, c)
        return [(3, r, 2 * inverse_err(x, y, f, a, c, r))]
    if name == "rev_backward_step":
        r = ref.rev_backward_step(*bufs, a, c, coef_grads=True)
        e = backward_step_bounds(*bufs, a, c, r)
        return [(0, r[0], 2 * e[0]), (3, r[1], 2 * e[1]), (4, r[2], 2 * e[2])]
    x, g = bufs[:2]
    al = d64(a)
    if name == "coupling_step":
        return [(2, ref.coupling_step(x, g, a), 6 * U * (al.abs() * d64(x).abs() + d64(g).abs()))]
    r = ref.coupling_inverse(x, g, a)
    e = 2 * U * (d64(x).abs() + d64(g).abs()) / al.abs() + 4 * U * d64(r).abs()
    if name == "coupling_inverse":
        return [(2, r, e)]
    return [(0, r, e), (2, a * bufs[2], 4 * U * (al * d64(bufs[2])).abs())]


N_BUFS = {"rev_step": 4, "rev_inverse": 4, "rev_backward_step": 5, "coupling_step": 3,
          "coupling_inverse": 3, "coupling_backward_step": 3}


@pytest.mark.parametrize("shift", range(len(LAYOUTS)))
@pytest.mark.parametrize("name", OPS)
def test_mixed_non_contiguous_layouts(device, name, shift):
    """Every operand, `out` included, in a different layout: each buffer's own strides must be used."""
    a, c = coef_pair(("channel", "0d"), LAYOUT_SHAPE, device)
    if name.startswith("coupling"):
        c = None
    vals = [rand(LAYOUT_SHAPE, device) for _ in range(N_BUFS[name])]
    expected = expected_of(name, vals, a, c)
    placed = [relayout(v, LAYOUTS[(i + shift) % len(LAYOUTS)]) for i, v in enumerate(vals)]
    bufs = [v for v, _ in placed]
    written = {i for i, _, _ in expected}
    if name in ("rev_step", "rev_inverse", "coupling_step", "coupling_inverse"):
        out_i = N_BUFS[name] - 1
        bufs[out_i].fill_(float("nan"))  # a fresh output buffer

    run_op(name, bufs, a, c)

    for i, want, bound in expected:
        assert_within(bufs[i], want, bound, f"{name} non-contiguous")
    for i, (v, base) in enumerate(placed):
        if i in written:
            assert_base_intact(v, base)
        else:
            assert torch.equal(v, vals[i]), f"read-only operand {i} of {name} was modified"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["rev_step", "rev_inverse", "coupling_step", "coupling_inverse"])
def test_in_place(device, name, layout):
    """out=<first operand> writes into it and returns it (same storage), with the right values."""
    a, c = coef_pair(("channel", "float"), LAYOUT_SHAPE, device)
    n = N_BUFS[name] - 1
    vals = [rand(LAYOUT_SHAPE, device) for _ in range(n)]
    expected = expected_of(name, vals + [None], a, c)
    x, base = relayout(vals[0], layout)
    ptr = x.data_ptr()
    bufs = [x] + [v.clone() for v in vals[1:]]
    bufs.append(x)  # out = the operand it replaces

    res = run_op(name, bufs, a, c)

    assert res is x and res.data_ptr() == ptr
    (_, want, bound), = expected
    assert_within(x, want, bound, f"{name} in place")
    assert_base_intact(x, base)
    for b, v in zip(bufs[1:-1], vals[1:]):
        assert torch.equal(b, v)


def test_in_place_step_then_inverse_restores_the_buffer(device):
    """The scheduler's pattern: p_prev becomes p_next in place, then back."""
    shape = (3, 17, 40)
    x, y, f = rand(shape, device), rand(shape, device), rand(shape, device, torch.bfloat16)
    a = make_coef("channel", "a", shape[-1], device)
    buf = x.clone()
    rk.rev_step(buf, y, f, a, 0.3, out=buf)
    rk.rev_inverse(buf, y, f, a, 0.3, out=buf)
    assert_within(buf, x, round_trip_bound(x, y, f, a, 0.3), "in-place round trip")


@pytest.mark.parametrize("coef", ["f64_0d", "bf16_0d", "f64_channel", "strided_channel"])
def test_coefficient_dtypes_and_strides(device, coef):
    """Coefficient tensors of any floating dtype are read as fp32; a non-contiguous per-channel one
    is read at its own stride (regression: it was read as if contiguous)."""
    shape = (4, 40)
    x, y, f = (rand(shape, device) for _ in range(3))
    a = {"f64_0d": lambda: torch.tensor(0.7, dtype=torch.float64, device=device),
         "bf16_0d": lambda: torch.tensor(-1.5, dtype=torch.bfloat16, device=device),
         "f64_channel": lambda: make_coef("channel", "a", 40, device).double(),
         "strided_channel": lambda: make_coef("channel", "a", 80, device)[::2]}[coef]()
    for name, got, want, err in (
            ("rev_step", rk.rev_step(x, y, f, a, a), ref.rev_step(x, y, f, a, a), step_err(x, y, f, a, a)),
            ("coupling_step", rk.coupling_step(x, f, a), ref.coupling_step(x, f, a),
             3 * U * (d64(a).abs() * d64(x).abs() + d64(f).abs()))):
        assert_within(got, want, 2 * err, f"{name} with {coef} coefficient")
    A, gA, gB = x.clone(), y.clone(), f.clone()
    r = ref.rev_backward_step(x, y, f, y, f, a, a, coef_grads=True)
    e = backward_step_bounds(x, y, f, y, f, a, a, r)
    _, da, dc = rk.rev_backward_step(A, y.clone(), f.clone(), gA, gB, a, a, coef_grads=True)
    assert_within(A, r[0], 2 * e[0], f"backward A_new with {coef} coefficient")
    assert_within(da, r[4], 2 * e[4], f"backward dL/da with {coef} coefficient")


def test_float64_states_use_the_reference_formulas(device):
    """float64 states take the PyTorch path in float64 (no fp32 rounding anywhere): every output within
    the fp32 bounds of NUMERICS scaled to float64's unit roundoff (S = u64 / u)."""
    shape = (3, 17, 40)
    x, y, f, g, h = (torch.randn(shape, dtype=torch.float64, device=device) for _ in range(5))
    a = torch.rand(40, dtype=torch.float64, device=device) + 0.5
    S = 2.0 ** -53 / U
    z = rk.rev_step(x, y, f, a, 0.3)
    assert z.dtype == torch.float64
    assert_within(z, a * x + (1 - a) * y + 0.3 * f, 2 * S * step_err(x, y, f, a, 0.3), "float64 rev_step")
    back = ref.rev_inverse(z, y, f, a, 0.3)
    assert_within(rk.rev_inverse(z, y, f, a, 0.3), back, 2 * S * inverse_err(z, y, f, a, 0.3, back),
                  "float64 rev_inverse")
    assert_within(rk.coupling_step(x, y, a), ref.coupling_step(x, y, a),
                  2 * S * 3 * U * (a.abs() * x.abs() + y.abs()), "float64 coupling_step")
    x2, gx = x.clone(), g.clone()
    rk.coupling_backward_step(x2, y, gx, a)
    assert_within(x2, ref.coupling_inverse(x, y, a), 2 * S * (U * (x.abs() + y.abs()) / a.abs() + 2 * U * x2.abs()),
                  "float64 coupling_inverse")
    assert_within(gx, a * g, 2 * S * U * (a * g).abs(), "float64 coupling_backward gx")  # was rounded to fp32
    for pending in (None, h):
        A, gA, gB = x.clone(), g.clone(), y.clone()
        got = rk.rev_backward_step(A, f, y, gA, gB, a, 0.3, coef_grads=True, g_pending=pending)
        r = ref.rev_backward_step(x, f, y, g, y, a, 0.3, coef_grads=True, g_pending=pending)
        # with g_pending, g = gA + g_pending carries one more rounding: bounds taken on |gA| + |g_pending|
        g_abs = g.abs() if pending is None else g.abs() + pending.abs()
        bounds = backward_step_bounds(x, f, y, g_abs, y, a, 0.3, r)
        for what, value, want, bound in zip(("A", "gA", "gB", "gf", "da", "dc"), (A, gA, gB, *got), r, bounds):
            if what in ("da", "dc"):    # coefficient gradients are fp32 by contract: one more rounding
                assert value.dtype == torch.float32, what
                bound = bound + U * d64(want).abs() / (2 * S)
            else:
                assert value.dtype == torch.float64, what
            assert_within(value, want, 4 * S * bound, f"float64 backward {what}, g_pending={pending is not None}")


def test_meta_tensors_propagate_shapes():
    """Meta tensors hold no memory: ops on them only propagate shapes (no false aliasing errors)."""
    x, y, f, out, gA, gB = (torch.empty(3, 5, 8, device="meta") for _ in range(6))
    assert rk.rev_step(x, y, f, 0.5, 0.3, out=out) is out
    gf, da, dc = rk.rev_backward_step(x, y, f, gA, gB, 0.5, torch.ones(8, device="meta"), coef_grads=True)
    assert gf.shape == (3, 5, 8) and gf.device.type == "meta" and da.shape == () and dc.shape == (8,)
