"""Memory for speed: `stored_layers` (layers that keep their autograd graph) and `store_policy`
(recomputed layers that keep their matmul and attention outputs) in the reversible stacks.

Every configuration is checked against ordinary autograd of the same forward (`reversible=False`) for
every scheme, odd and even depths and k in {0, 1, odd, L} plus explicit indices; exact mode must give
the same bits whatever is stored; k=0 is the plain reversible stack; the saved bytes grow with k and the
policy's kept bytes are exactly the matmul/attention outputs of the recomputed layers.

Tolerance (fp32): normwise 1e-5 on the CPU, about 80 eps32 for at most 4 layers of d=16. The measured
error of every configuration here is <= 1.6e-6 (the reversible backward's rounding in the inverse and
fused kernels, and stored op outputs of the forward's input against a recompute at the rebuilt state,
which differ by that rounding); a wrong vjp, a stale state or a misplaced stored output is off by O(1).
CUDA: 1e-4, SDPA's fp32 kernels round differently between the stored and the recomputed path.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too; must precede `import triton`

import pytest  # noqa: E402
import torch  # noqa: E402

import revkernels as rk  # noqa: E402
from revkernels.memory import SavedTensorBytes  # noqa: E402
from revkernels.store import _storable  # noqa: E402

D, HEADS, T, B = 16, 2, 8, 2
SCHEMES = ("midpoint", "leapfrog", "midpoint_a", "hamiltonian")
POLICIES = (None, "matmuls")


def make(scheme, depth, device="cpu", dropout=0.0, **kw):
    """A stack of `depth` layers built from seed 0 (the same weights for every k and policy)."""
    torch.manual_seed(0)
    if scheme == "hamiltonian":
        stack = rk.HamiltonianStack([rk.AttentionBlock(D, HEADS, dropout) for _ in range(depth)],
                                    [rk.MLPBlock(D, dropout) for _ in range(depth)], **kw)
    else:
        stack = rk.ReversibleStack([rk.TransformerBlock(D, HEADS, dropout) for _ in range(depth)], scheme,
                                   h=0.5, **kw)
    return stack.to(device)


def x_in(device="cpu"):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(1)).to(device)


def run(stack, x, seed=3):
    """[output, dL/dx, dL/dparams...] of L = <y, w> with a fixed non-uniform w; RNG seeded before."""
    for p in stack.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = stack(x)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    return [y.detach(), x.grad, *(p.grad for p in stack.parameters())]


def normwise(got, ref):
    return max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(got, ref))


def tol(device):
    return 1e-5 if torch.device(device).type == "cpu" else 1e-4


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("depth", (3, 4))
@pytest.mark.parametrize("store_policy", POLICIES)
def test_gradients_match_ordinary_autograd(scheme, depth, store_policy, device):
    x = x_in(device)
    ref_stack = make(scheme, depth, device)
    ref_stack.reversible = False
    ref = run(ref_stack, x)
    for k in (0, 1, 3 if depth == 4 else 2, depth, [0, depth - 1]):     # 0, 1, odd/even, all, indices
        stack = make(scheme, depth, device, stored_layers=k, store_policy=store_policy)
        got = run(stack, x)
        assert all(g is not None for g in got), k
        assert normwise(got, ref) <= tol(device), (k, normwise(got, ref))
        assert stack.last_reconstruction_error is not None and stack.last_reconstruction_error < 1e-5


@pytest.mark.parametrize("scheme", ("midpoint", "leapfrog", "hamiltonian"))
def test_dropout_replays_with_stored_layers_and_policy(scheme):
    """Stored layers keep their masks in the graph; recomputed ones replay the RNG, around the policy's
    stored outputs."""
    x = x_in()
    ref_stack = make(scheme, 3, dropout=0.2)
    ref_stack.reversible = False
    ref = run(ref_stack, x)
    for k in (1, 3):
        got = run(make(scheme, 3, dropout=0.2, stored_layers=k, store_policy="matmuls"), x)
        assert normwise(got, ref) <= tol("cpu"), k


def test_learnable_a_gradient_with_stored_layers():
    """dL/da_j of a stored layer comes from the fused step with the stored f_j."""
    x = x_in()
    ref_stack = make("midpoint_a", 3, learnable_a=True)
    ref_stack.reversible = False
    ref = run(ref_stack, x)
    got = run(make("midpoint_a", 3, learnable_a=True, stored_layers=2, store_policy="matmuls"), x)
    assert normwise(got, ref) <= tol("cpu")


def test_k0_is_the_plain_stack_and_the_forward_never_changes():
    """stored_layers=0 and store_policy=None are the stack without the arguments, bit for bit; and no
    k or policy changes the forward's output bits (stored layers run the same block on the same
    values, with grad)."""
    x = x_in()
    for scheme in SCHEMES:
        plain = run(make(scheme, 3), x)
        zero = run(make(scheme, 3, stored_layers=0, store_policy=None), x)
        assert all(torch.equal(a, b) for a, b in zip(plain, zero)), scheme
        for k in (1, 3):
            for policy in POLICIES:
                y = make(scheme, 3, stored_layers=k, store_policy=policy)(x)
                assert torch.equal(y, plain[0]), (scheme, k, policy)


@pytest.mark.parametrize("scheme", ("midpoint", "midpoint_a", "hamiltonian"))
def test_exact_mode_same_bits_whatever_is_stored(scheme):
    """Exact mode rebuilds every state bit for bit, so the stored graphs and op outputs are those the
    recompute would build: gradients are bitwise those of k=0, and the meter reads 0.0."""
    kw = dict(exact=True, **({"a": 0.5} if scheme == "midpoint_a" else {}))
    x = x_in()
    ref = run(make(scheme, 3, **kw), x)
    for k in (1, 3, [0, 2]):
        for policy in POLICIES:
            stack = make(scheme, 3, stored_layers=k, store_policy=policy, **kw)
            got = run(stack, x)
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), (k, policy)
            assert stack.last_reconstruction_error == 0.0
            if scheme == "midpoint_a":
                assert stack.last_side_info_bytes > 0


def test_run_blocks_and_settable_options():
    """run_blocks (the retrofit's entry) honours the options; both can be changed after construction."""
    x = x_in()
    ref_stack = make("midpoint", 3)
    ref_stack.reversible = False
    ref = run(ref_stack, x)
    stack = make("midpoint", 3)
    stack.stored_layers, stack.store_policy = 2, "matmuls"
    assert stack.stored_layers == (1, 2)
    for p in stack.parameters():
        p.grad = None
    xr = x.clone().requires_grad_(True)
    y = stack.run_blocks(xr, list(stack.blocks))
    assert stack.last_policy_bytes > 0
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert normwise([y.detach(), xr.grad, *(p.grad for p in stack.parameters())], ref) <= tol("cpu")


# ----------------------------------------------------------------------------- memory

def saved_bytes(stack, x):
    """(bytes saved for backward, bytes the store policy kept) of one forward; the backward then runs."""
    x = x.clone().requires_grad_(True)
    with SavedTensorBytes(exclude=[*stack.parameters(), *stack.buffers(), x]) as m:
        y = stack(x)
    y.sum().backward()
    return m.bytes, stack.last_policy_bytes


@pytest.mark.parametrize("scheme", ("midpoint", "hamiltonian"))
def test_saved_bytes_grow_with_k(scheme):
    depth, x = 4, x_in()
    default, _ = saved_bytes(make(scheme, depth), x)
    by_k = [saved_bytes(make(scheme, depth, stored_layers=k), x)[0] for k in range(depth + 1)]
    assert by_k[0] == default
    steps = [b - a for a, b in zip(by_k, by_k[1:])]
    assert all(s > 0 for s in steps)
    assert max(steps) == min(steps)            # every stored layer costs the same: its graph and f_j
    ordinary = make(scheme, depth)
    ordinary.reversible = False
    per_layer_ordinary = saved_bytes(ordinary, x)[0] / depth
    # A stored layer saves what ordinary autograd saves for the layer, plus its output f_j (one state
    # per block) for the inverse step: within two states of it.
    state = B * T * D * 4
    assert per_layer_ordinary <= steps[0] <= per_layer_ordinary + 2 * state + state // 2


@pytest.mark.parametrize("scheme", ("midpoint", "hamiltonian"))
def test_policy_keeps_matmul_and_attention_outputs_of_recomputed_layers(scheme):
    """Per recomputed layer the policy keeps qkv (3 states), the attention output and its logsumexp
    (B*H*T floats), the two projections (1 state each) and the MLP's hidden layer (4 states); stored
    layers keep nothing of it, and saved-tensor hooks see none of it."""
    depth, x = 4, x_in()
    state, lse = B * T * D * 4, B * HEADS * T * 4
    plain, _ = saved_bytes(make(scheme, depth), x)
    for k in range(depth + 1):
        saved, kept = saved_bytes(make(scheme, depth, stored_layers=k, store_policy="matmuls"), x)
        assert kept == (depth - k) * (10 * state + lse), k
        assert saved == saved_bytes(make(scheme, depth, stored_layers=k), x)[0]
    assert saved_bytes(make(scheme, depth, store_policy="matmuls"), x)[0] == plain


def test_nothing_is_kept_without_a_backward():
    """Under no_grad (or with nothing requiring grad) the stored layers run like the others."""
    stack = make("midpoint", 3, stored_layers=3, store_policy="matmuls")
    with torch.no_grad():
        y = stack(x_in())
    assert not y.requires_grad and stack.last_policy_bytes == 0
    stack.requires_grad_(False)
    with SavedTensorBytes() as m:
        stack(x_in())
    assert m.bytes == 0 and stack.last_policy_bytes == 0


def test_attention_with_dropout_is_recomputed_not_stored():
    """Skipping a seeded attention in the recompute would shift the RNG stream that later dropout in the
    block replays; the policy keeps it only without dropout."""
    q = torch.randn(1, 1, 4, 8)
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        op = getattr(torch.ops.aten, name).default
        assert _storable(op, (q, q, q, 0.0), {})
        assert not _storable(op, (q, q, q, 0.1), {})
        assert not _storable(op, (q, q, q), {"dropout_p": 0.1})
    assert _storable(torch.ops.aten.mm.default, (q[0, 0], q[0, 0].T), {})
    assert not _storable(torch.ops.aten.gelu.default, (q,), {})


# ----------------------------------------------------------------------------- models and refusals

def test_gpt_config_passes_the_options():
    cfg = dict(vocab_size=32, seq_len=8, d_model=D, n_heads=HEADS, n_layers=3)
    model = rk.GPT(rk.GPTConfig(arch="hamiltonian", stored_layers=[0, 2], store_policy="matmuls", **cfg))
    assert model.body.stored_layers == (0, 2) and model.body.store_policy == "matmuls"
    model = rk.GPT(rk.GPTConfig(arch="midpoint", stored_layers=1, **cfg))
    assert model.body.stored_layers == (2,)
    for arch in ("baseline", "checkpoint"):
        with pytest.raises(ValueError, match="stored_layers and store_policy need a reversible arch"):
            rk.GPTConfig(arch=arch, stored_layers=1, **cfg)
        with pytest.raises(ValueError, match="stored_layers and store_policy need a reversible arch"):
            rk.GPTConfig(arch=arch, store_policy="matmuls", **cfg)
    with pytest.raises(ValueError, match="stored_layers=4"):
        rk.GPT(rk.GPTConfig(arch="midpoint", stored_layers=4, **cfg))


@pytest.mark.parametrize("bad, error, match", [
    (-1, ValueError, "stored_layers=-1"),
    (4, ValueError, "stored_layers=4"),
    (True, TypeError, "stored_layers"),
    (1.5, TypeError, "stored_layers"),
    ("2", TypeError, "stored_layers"),
    (torch.tensor([1]), TypeError, "stored_layers"),
    ([0, 0], ValueError, "stored_layers .* names a layer twice"),
    ([3], ValueError, "stored_layers holds 3"),
    ([-1], ValueError, "stored_layers holds -1"),
    ([1.0], TypeError, "stored_layers holds 1.0"),
])
@pytest.mark.parametrize("scheme", ("midpoint", "hamiltonian"))
def test_bad_stored_layers_refused(scheme, bad, error, match):
    with pytest.raises(error, match=match):
        make(scheme, 3, stored_layers=bad)
    stack = make(scheme, 3)
    with pytest.raises(error, match=match):
        stack.stored_layers = bad
    assert stack.stored_layers == ()


def test_bad_store_policy_refused():
    with pytest.raises(ValueError, match="store_policy must be None or one of"):
        make("midpoint", 2, store_policy="all")
    stack = make("hamiltonian", 2)
    with pytest.raises(ValueError, match="store_policy must be None or one of"):
        stack.store_policy = "everything"
    assert stack.store_policy is None


# ----------------------------------------------------------------------------- torch.compile

def test_compiled_blocks_keep_stored_graphs_and_policy_outputs():
    """Blocks compiled on their own (DESIGN 6: compile the blocks, not the stack) run compiled in the
    forward and in the recompute alike: the policy replays the compiled graph's matmuls."""
    x = x_in()
    ref_stack = make("midpoint", 3)
    ref_stack.reversible = False
    ref = run(ref_stack, x)
    stack = make("midpoint", 3, stored_layers=1, store_policy="matmuls")
    stack.blocks = torch.nn.ModuleList(torch.compile(b, backend="aot_eager") for b in stack.blocks)
    got = run(stack, x)
    assert stack.last_policy_bytes > 0
    assert normwise(got, ref) <= tol("cpu")
    torch._dynamo.reset()


@pytest.mark.parametrize("fullgraph", (True, False))
def test_whole_model_compile(monkeypatch, fullgraph):
    """fullgraph=True: refused at the forward (the traced backward cannot keep graphs or replay op
    outputs). With graph breaks, Dynamo hands the stack back to eager; the policy's forward runs the
    blocks with Dynamo off, as the eager recompute does, so both see the same ops: eager's gradients."""
    monkeypatch.undo()  # conftest's NaN-filling allocator wrappers are not traceable
    torch.manual_seed(0)
    cfg = dict(vocab_size=32, seq_len=8, d_model=D, n_heads=HEADS, n_layers=3)
    model = rk.GPT(rk.GPTConfig(arch="midpoint", stored_layers=1, store_policy="matmuls", **cfg))
    idx, targets = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))
    model(idx, targets)[1].backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=fullgraph, backend="aot_eager")
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            if fullgraph:
                with pytest.raises(Exception, match="stored_layers / store_policy under a whole-model torch.compile"):
                    compiled(idx, targets)
                return
            compiled(idx, targets)[1].backward()
        for p, g in zip(model.parameters(), ref):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)   # the same eager kernels: equal
    finally:
        torch._dynamo.reset()


def test_numpy_integers_accepted():
    np = pytest.importorskip("numpy")
    assert make("midpoint", 3, stored_layers=np.int64(2)).stored_layers == (1, 2)
    assert make("midpoint", 3, stored_layers=[np.int64(2), np.int64(0)]).stored_layers == (0, 2)
