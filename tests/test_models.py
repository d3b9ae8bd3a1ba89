"""GPT: every arch trains, the chunked loss equals the full one, the reversible bodies match
ordinary autograd, and bad configurations are refused."""
import math

import pytest
import torch

import revkernels as rk
from revkernels.models import ARCHS

VOCAB = 64


def tiny(arch="baseline", **kw):
    cfg = dict(vocab_size=VOCAB, seq_len=16, d_model=32, n_heads=4, n_layers=3, arch=arch)
    cfg.update(kw)  # may override arch
    return rk.GPT(rk.GPTConfig(**cfg))


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_trains(arch):
    model = tiny(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx, targets = torch.randint(0, VOCAB, (4, 16)), torch.randint(0, VOCAB, (4, 16))
    losses = []
    for _ in range(6):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    # Init weights are N(0, 0.02): logits are near zero, so the loss is near uniform, log(V) = 4.16.
    assert abs(losses[0] - math.log(VOCAB)) < 0.1
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("arch", ["baseline", "midpoint", "hamiltonian"])
def test_chunked_loss_matches_full_loss(arch):
    full, chunked = tiny(arch), tiny(arch, loss_chunk_tokens=7)
    chunked.load_state_dict(full.state_dict())
    idx, targets = torch.randint(0, VOCAB, (3, 16)), torch.randint(0, VOCAB, (3, 16))
    targets[0, :5] = -1                                    # ignored tokens
    logits, loss_full = full(idx, targets)
    none, loss_chunked = chunked(idx, targets)
    assert logits.shape == (3, 16, VOCAB) and none is None
    loss_full.backward()
    loss_chunked.backward()
    # Same fp32 math summed in a different order: a few ulps of a ~4.2 loss.
    torch.testing.assert_close(loss_chunked, loss_full, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(full.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ["midpoint", "leapfrog", "midpoint_a", "hamiltonian"])
def test_reversible_gpt_gradients_match_autograd(arch):
    model = tiny(arch, n_layers=5)
    idx, targets = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    grads = {}
    for reversible in (True, False):
        model.zero_grad()
        model.body.reversible = reversible
        model(idx, targets)[1].backward()
        grads[reversible] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads[False].items():
        # fp32, depth 5: the rebuilt states differ from the stored ones by a few ulps per layer.
        torch.testing.assert_close(grads[True][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_checkpoint_matches_baseline():
    base, ckpt = tiny("baseline"), tiny("checkpoint")
    ckpt.load_state_dict(base.state_dict())
    idx = torch.randint(0, VOCAB, (2, 16))
    for m in (base, ckpt):
        m(idx, idx)[1].backward()
    for p, q in zip(base.parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)


def test_head_is_tied_and_inference_returns_logits():
    model = tiny("midpoint")
    assert model.lm_head.weight is model.wte.weight
    logits, loss = model(torch.randint(0, VOCAB, (2, 9)))
    assert logits.shape == (2, 9, VOCAB) and loss is None


@pytest.mark.parametrize("bad, match", [
    (dict(arch="resnet"), "arch"),
    (dict(d_model=30), "divisible"),
    (dict(n_layers=0), "n_layers"),
])
def test_bad_config_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{"arch": "baseline", **bad})


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="seq_len"):
        tiny("baseline")(torch.randint(0, VOCAB, (1, 17)))
