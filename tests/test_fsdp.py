"""Per-block FSDP2 (the standard LLM recipe: `fully_shard` on each block, then on the model), FSDP1 and
parameter-swapping wrappers under the reversible backward.

FSDP2 unshards each block's parameters into new tensors at every forward, the backward's recompute
included; the scheduler must differentiate those and let FSDP2's hooks reduce-scatter them (DESIGN 6:
before, every block parameter silently got grad=None). Two gloo processes on CPU run every case in one
spawn (tests/fsdp_cases.py); here each is compared with one process on the global batch.

Tolerances: fp32, rtol 1e-5 -- the two runs differ by the summation order of the mean over two half
batches (a few ulps) propagated through 3 layers and one SGD step. bf16 parameters (MixedPrecisionPolicy):
FlashAttention's rule, |rev_bf16 - ref32| <= 2 |ordinary_bf16 - ref32| + atol, with the ordinary-autograd
bf16 run under the same FSDP2 wrapping as the low-precision reference.
"""
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import revkernels as rk

sys.path.insert(0, os.path.dirname(__file__))
import fsdp_cases as cases  # noqa: E402

ARCHS = ("midpoint", "leapfrog", "midpoint_a", "hamiltonian", "retrofit")


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(cases.worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return torch.load(out / "fsdp.pt")


def single_process(arch):
    """The gradients of two SGD steps on the global batch in one process, no wrapper."""
    return cases.train_two_steps(cases.build(arch), rank=0, world=1)


def normwise(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_matches(got_steps, ref_steps, rtol=1e-5):
    for step, (got, ref) in enumerate(zip(got_steps, ref_steps)):
        assert got.keys() == ref.keys()
        for name, g in got.items():
            assert g is not None, f"step {step}: {name} got no gradient"
            assert normwise(g, ref[name]) <= rtol, (step, name, normwise(g, ref[name]))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("reshard", [True, False])
def test_per_block_fsdp2_matches_one_process(distributed, arch, reshard):
    assert_matches(distributed[f"{arch}-reshard{reshard}"], single_process(arch))


@pytest.mark.parametrize("arch", cases.HF_ARCHS)
def test_per_layer_fsdp2_of_a_retrofitted_hf_model_matches_one_process(distributed, arch):
    assert_matches(distributed[f"{arch}-reshardTrue"], single_process(arch))


@pytest.mark.parametrize("arch", cases.EXACT_ARCHS)
def test_per_block_fsdp2_exact_mode_matches_one_process(distributed, arch):
    # Exact mode's backward takes the same vjp path (the leaves the recompute used).
    assert_matches(distributed[f"{arch}-reshardTrue"], single_process(arch))


@pytest.mark.parametrize("arch", cases.HYBRID_ARCHS)
@pytest.mark.parametrize("reshard", [True, False])
def test_per_block_fsdp2_stored_layers_and_store_policy(distributed, arch, reshard):
    # Stored layers build their graph in the forward with FSDP2's unsharded parameters; their vjp must
    # still reach FSDP2's reduce-scatter (and the policy's recomputed layer its usual path).
    assert_matches(distributed[f"{arch}-reshard{reshard}"], single_process(arch))


@pytest.mark.parametrize("arch", ["midpoint", "hamiltonian", "retrofit"])
def test_per_block_fsdp2_gradient_accumulation(distributed, arch):
    # Two micro-batches per rank, set_requires_gradient_sync(False) on the first.
    assert_matches(distributed[f"{arch}-accumulate"], single_process(arch))


@pytest.mark.parametrize("arch", ["midpoint", "hamiltonian"])
def test_per_block_fsdp2_bf16_parameters(distributed, arch):
    ref32 = single_process(arch)
    rev, ordinary = distributed[f"{arch}-bf16-reversibleTrue"], distributed[f"{arch}-bf16-reversibleFalse"]
    for step in range(2):
        for name, ref in ref32[step].items():
            assert rev[step][name] is not None, name
            err_rev = (rev[step][name] - ref).abs().max().item()
            err_torch = (ordinary[step][name] - ref).abs().max().item()
            assert err_rev <= 2 * err_torch + 1e-3 * ref.abs().max().item(), (step, name, err_rev, err_torch)


def test_per_block_fsdp2_activation_memory_flat_in_depth(distributed):
    # Saved-for-backward bytes of the forward at depth 2 and 6: the two state buffers and the
    # per-layer coefficients, nothing per block.
    mem = distributed["memory"]
    assert mem[6] <= mem[2] * 1.05, mem


def test_fsdp1_refused_with_fsdp2_advice(distributed):
    # FSDP1 (FlatParameter) is refused: per-block wrapping at the first forward, root-only wrapping at
    # the backward (its parameters are swapped for flat-parameter views no hook routes back).
    assert isinstance(distributed["fsdp1-per-block"], str)
    assert "FSDP1" in distributed["fsdp1-per-block"] and "fully_shard" in distributed["fsdp1-per-block"]
    assert isinstance(distributed["fsdp1-root"], str)
    assert "FSDP2" in distributed["fsdp1-root"] and "no gradient" in distributed["fsdp1-root"]


def test_per_block_fsdp2_under_whole_model_compile(distributed):
    # With graph breaks allowed, Dynamo hands the stack back to eager, whose backward handles FSDP2;
    # with fullgraph=True the traced backward could not, so the stack refuses at the forward.
    assert_matches(distributed["midpoint-compiled"], single_process("midpoint"))
    assert "per-block FSDP2 cannot run under a whole-model torch.compile" in distributed["compiled-fullgraph"]


class CloningWrapper(nn.Module):
    """Runs `inner` on detached copies of its parameters: the copies get the gradients, the module's
    own parameters none -- what any wrapper that swaps parameters without routing gradients back does."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        copies = {n: p.detach().clone().requires_grad_() for n, p in self.inner.named_parameters()}
        return torch.func.functional_call(self.inner, copies, (x,))


@pytest.mark.parametrize("stack", ["three_term", "hamiltonian"])
def test_parameter_swapping_wrapper_raises_naming_block_and_parameter(stack):
    d = 16
    if stack == "three_term":
        model = rk.ReversibleStack([rk.TransformerBlock(d, 2), CloningWrapper(rk.TransformerBlock(d, 2))])
        block, param = 1, "inner.attn.ln.weight"
    else:
        model = rk.HamiltonianStack([CloningWrapper(rk.AttentionBlock(d, 2))], [rk.MLPBlock(d)])
        block, param = 0, "inner.ln.weight"
    y = model(torch.randn(2, 4, d))
    with pytest.raises(RuntimeError, match=rf"parameter '{param}' of block {block} .*no gradient"):
        y.sum().backward()


def test_reentrant_checkpoint_inside_a_block_names_the_non_reentrant_form():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self, inner, reentrant):
            super().__init__()
            self.inner, self.reentrant = inner, reentrant

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=self.reentrant)

    torch.manual_seed(0)
    x = torch.randn(2, 4, 16)
    inner = [rk.TransformerBlock(16, 2) for _ in range(2)]
    bad = rk.ReversibleStack([Checkpointed(b, True) for b in inner])
    with pytest.raises(RuntimeError, match="use_reentrant=True.*use_reentrant=False"):
        bad(x).sum().backward()
    # The non-reentrant form works and gives the gradients of the plain blocks.
    good = rk.ReversibleStack([Checkpointed(b, False) for b in inner])
    good(x).sum().backward()
    got = [p.grad.clone() for p in good.parameters()]
    good.zero_grad()
    rk.ReversibleStack(inner)(x).sum().backward()
    for g, p in zip(got, good.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)
