"""GPT: every arch trains, the chunked loss equals the full one, the reversible bodies match
ordinary autograd, and bad configurations are refused.

Devices: tests that run a model take conftest's `device` fixture (CPU through Triton's interpreter;
CUDA with the compiled kernels when present). Models are built on the CPU (same init on every device)
and moved with .to(device); token ids are drawn on the CPU and moved. Tests of argument checks raised
before any computation stay CPU-only."""
import contextlib
import math

import pytest
import torch

import revkernels as rk
from revkernels.models import ARCHS

VOCAB = 64


def tiny(arch="baseline", device="cpu", **kw):
    cfg = dict(vocab_size=VOCAB, seq_len=16, d_model=32, n_heads=4, n_layers=3, arch=arch)
    cfg.update(kw)  # may override arch
    return rk.GPT(rk.GPTConfig(**cfg)).to(device)


def tokens(shape, device):
    """Token ids from the global CPU generator (the same ids on every device), moved to `device`."""
    return torch.randint(0, VOCAB, shape).to(device)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_trains(arch, device):
    model = tiny(arch, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx, targets = tokens((4, 16), device), tokens((4, 16), device)
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
def test_chunked_loss_matches_full_loss(arch, device):
    full, chunked = tiny(arch, device), tiny(arch, device, loss_chunk_tokens=7)
    chunked.load_state_dict(full.state_dict())
    idx, targets = tokens((3, 16), device), tokens((3, 16), device)
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
def test_reversible_gpt_gradients_match_autograd(arch, device):
    model = tiny(arch, device, n_layers=5)
    idx, targets = tokens((2, 16), device), tokens((2, 16), device)
    grads = {}
    for reversible in (True, False):
        model.zero_grad()
        model.body.reversible = reversible
        model(idx, targets)[1].backward()
        grads[reversible] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads[False].items():
        # fp32, depth 5: the rebuilt states differ from the stored ones by a few ulps per layer.
        torch.testing.assert_close(grads[True][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_checkpoint_matches_baseline(device):
    """Bitwise: the recompute runs the same deterministic kernels on the same inputs. On CUDA attention
    runs SDPA's math backend (plain matmuls; the memory-efficient kernel's backward may accumulate with
    atomics, in any order)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    base, ckpt = tiny("baseline", device), tiny("checkpoint", device)
    ckpt.load_state_dict(base.state_dict())
    idx = tokens((2, 16), device)
    with sdpa_kernel([SDPBackend.MATH]) if device.type == "cuda" else contextlib.nullcontext():
        for m in (base, ckpt):
            m(idx, idx)[1].backward()
    for p, q in zip(base.parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)


def test_head_is_tied_and_inference_returns_logits(device):
    model = tiny("midpoint", device)
    assert model.lm_head.weight is model.wte.weight
    logits, loss = model(tokens((2, 9), device))
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


# ---------------------------------------------------------------- non-contiguous inputs

@pytest.mark.parametrize("chunk", [0, 5])
def test_non_contiguous_idx_and_targets_give_the_contiguous_loss(chunk, device):
    model = tiny("midpoint", device, loss_chunk_tokens=chunk)
    data = tokens((3, 17), device)
    idx, targets = data[:, :-1], data[:, 1:]
    assert not idx.is_contiguous() and not targets.is_contiguous()
    _, loss = model(idx, targets)
    _, ref = model(idx.contiguous(), targets.contiguous())
    assert torch.equal(loss, ref)
    loss.backward()


def test_targets_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="targets"):
        tiny()(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long))


# ---------------------------------------------------------------- generate

def argmax_rollout(model, idx, n):
    """Greedy decoding by hand: append argmax of the last position's logits, context cropped to seq_len."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.cfg.seq_len:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_each_arch(arch, device):
    model = tiny(arch, device)
    prompt = tokens((2, 20), device)            # longer than seq_len=16: the context is cropped
    torch.manual_seed(1)                        # seeds the CUDA generator too
    out = model.generate(prompt, 5)
    assert out.shape == (2, 25) and out.dtype == torch.long
    assert torch.equal(out[:, :20], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB
    torch.manual_seed(1)
    assert torch.equal(model.generate(prompt, 5), out)       # same seed, same samples
    model.eval()
    with torch.no_grad():
        greedy = argmax_rollout(model, prompt, 5)
    model.train()
    assert torch.equal(model.generate(prompt, 5, top_k=1), greedy)


def test_generate_runs_in_eval_mode_and_restores_training(device):
    model = tiny("leapfrog", device, dropout=0.5)
    prompt = tokens((2, 4), device)
    assert model.training
    first = model.generate(prompt, 6, top_k=1)
    assert model.training                                    # restored
    assert torch.equal(model.generate(prompt, 6, top_k=1), first)   # no dropout noise
    model.eval()
    with torch.no_grad():
        assert torch.equal(first, argmax_rollout(model, prompt, 6))


def test_generate_top_k_restricts_the_samples(device):
    model = tiny("baseline", device)
    prompt = tokens((1, 5), device).expand(256, 5)
    with torch.no_grad():
        top2 = set(model.eval()(prompt[:1])[0][0, -1].topk(2).indices.tolist())
    gen = torch.Generator(device=device).manual_seed(0)      # multinomial draws on the logits' device
    restricted = set(model.generate(prompt, 1, top_k=2, generator=gen)[:, -1].tolist())
    unrestricted = set(model.generate(prompt, 1, generator=gen)[:, -1].tolist())
    assert restricted == top2
    assert len(unrestricted) > 10                            # near-uniform logits at init: many tokens


def test_generate_does_not_record_a_graph(device):
    out = tiny("midpoint", device).generate(torch.zeros(1, 3, dtype=torch.long, device=device), 2)
    assert not out.requires_grad


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(idx=torch.zeros(2, 3)), TypeError, "idx"),
    (dict(idx=[[1, 2]]), TypeError, "idx"),
    (dict(idx=torch.zeros(3, dtype=torch.long)), ValueError, "idx"),
    (dict(idx=torch.zeros(2, 0, dtype=torch.long)), ValueError, "idx"),
    (dict(idx=torch.full((1, 2), VOCAB)), ValueError, "vocab_size"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.0), ValueError, "max_new_tokens"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=1.5), ValueError, "top_k"),
])
def test_generate_refuses_bad_arguments(kwargs, err, match):
    args = dict(idx=torch.zeros(1, 2, dtype=torch.long), max_new_tokens=1)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        tiny().generate(**args)
