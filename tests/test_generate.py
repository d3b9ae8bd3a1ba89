"""GPT.generate with the KV cache (revkernels.kv_cache) against use_cache=False, for every body.

Models are tiny and random, with weights scaled up from GPT-2's init (std 0.02) so that attention is
far from uniform and the logits are spread (std ~1): greedy tokens then sit far from ties, and cached
and uncached rollouts, whose logits differ only by rounding, pick the same tokens."""
import pytest
import torch

import revkernels as rk
from revkernels import ops
from revkernels.kv_cache import KVCache
from revkernels.models import ARCHS
from revkernels.retrofit import retrofit

VOCAB, SEQ_LEN = 64, 16
# every arch, exact mode of both reversible families, and today's retrofit (eq. 4.5: f_{j-1} is called
# iterations + 1 more times inside F_j, so a layer's attention runs up to three times per forward)
BODIES = ARCHS + ("midpoint-exact", "hamiltonian-exact", "midpoint-stored", "hamiltonian-stored", "retrofit-compact",
                  "retrofit-it1", "retrofit-it2", "retrofit-exact", "retrofit-linear")


pytestmark = pytest.mark.usefixtures("fallback_ops")   # conftest: the cache is the subject, not the kernels


def model_of(body, device="cpu", **kw):
    arch, _, variant = body.partition("-")
    if arch == "retrofit":
        arch = "baseline"
    cfg = dict(vocab_size=VOCAB, seq_len=SEQ_LEN, d_model=32, n_heads=4, n_layers=3, arch=arch,
               exact=variant == "exact" and body != "retrofit-exact")
    if variant == "stored":
        cfg.update(stored_layers=1, store_policy="matmuls")
    cfg.update(kw)
    model = rk.GPT(rk.GPTConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    if body.startswith("retrofit"):
        if variant == "compact":
            model = retrofit(model, a=0.5, form="compact", exact=False)
        elif variant == "linear":
            model = retrofit(model, a=0.5, form="linear", calibration=prompt((4, SEQ_LEN), "cpu"))
        else:
            model = retrofit(model, a=0.5, form="eq4.5", iterations=2 if variant == "it2" else 1,
                             exact=variant == "exact")
    return model.to(device).eval()


def prompt(shape, device):
    return torch.randint(0, VOCAB, shape).to(device)


@pytest.mark.parametrize("body", BODIES)
def test_greedy_tokens_with_cache_equal_without_past_seq_len(body, device):
    model = model_of(body, device)
    idx = prompt((2, 5), device)
    n = SEQ_LEN + 4                      # 5 + 20 tokens: the window slides for the last 9 steps
    cached = model.generate(idx, n, top_k=1)
    assert torch.equal(cached, model.generate(idx, n, top_k=1, use_cache=False))
    assert cached.shape == (2, 5 + n)


@pytest.mark.parametrize("body", ("baseline", "midpoint_a", "hamiltonian-exact", "retrofit-it1"))
def test_sampling_with_a_seeded_generator_is_the_same_with_cache(body, device):
    model = model_of(body, device)
    idx = prompt((3, 4), device)
    runs = [model.generate(idx, 20, temperature=0.8, top_k=10, use_cache=use_cache,
                           generator=torch.Generator(device=device).manual_seed(7))
            for use_cache in (True, False)]
    assert torch.equal(*runs)
    assert len(set(runs[0][:, 4:].flatten().tolist())) > 3        # sampled, not a constant rollout


@pytest.mark.parametrize("body", BODIES)
def test_cached_logits_match_the_full_forward(body, device):
    """Teacher-forced: prefill 4 tokens, then decode the rest of a seq_len sequence one token at a time;
    each step's logits against the full forward over the same prefix."""
    model = model_of(body, device)
    seq = prompt((2, SEQ_LEN), device)
    cache = KVCache(SEQ_LEN)
    worst = 0.0
    with torch.no_grad():
        for n in range(4, SEQ_LEN + 1):
            step = model(seq[:, cache.length:n], cache=cache)[0][:, -1]
            full = model(seq[:, :n])[0][:, -1]
            worst = max(worst, float((step - full).abs().max() / full.abs().max()))
    assert cache.length == SEQ_LEN
    # fp32: the decode step's attention sums over the same keys in another order and shape, a few
    # eps32 = 1.2e-7 per op, carried through 3 layers (and, for retrofit, up to 3 calls per layer):
    # 1e-5 relative leaves a 10x margin over the largest seen (~1e-6), while any wrong position,
    # mask or slot changes the logits by O(1).
    assert worst < 1e-5


def test_the_logit_check_fails_when_slots_are_swapped(device):
    """The check above can fail: decoding against another call's keys/values gives O(1) differences."""
    model = model_of("midpoint", device)
    seq = prompt((1, 8), device)
    with torch.no_grad():
        cache = KVCache(SEQ_LEN)
        model(seq[:, :7], cache=cache)
        cache._slots.reverse()                                  # layer j reads layer L-1-j's slot
        step = model(seq[:, 7:8], cache=cache)[0][:, -1]
        full = model(seq)[0][:, -1]
    assert float((step - full).abs().max() / full.abs().max()) > 1e-2


def test_readme_example_and_long_prompts_take_the_cropped_path(device):
    model = model_of("leapfrog", device)
    tokens = prompt((4, 65), device)
    out = model.generate(tokens[:, :8], max_new_tokens=16, temperature=0.8, top_k=20)
    assert out.shape == (4, 24)
    long = prompt((2, SEQ_LEN + 3), device)                    # longer than the window from the start
    assert torch.equal(model.generate(long, 4, top_k=1), model.generate(long, 4, top_k=1, use_cache=False))


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("body", ("baseline", "midpoint", "hamiltonian-exact", "retrofit-it1"))
def test_a_cache_in_a_grad_enabled_forward_is_refused(body):
    """Reversible bodies run their blocks inside an autograd Function (grad off there), so the check
    is made when the step starts, before anything is written."""
    model = model_of(body)
    cache = KVCache(SEQ_LEN)
    with pytest.raises(RuntimeError, match="grad-enabled"):
        model(prompt((1, 4), "cpu"), cache=cache)
    assert cache.length == 0 and cache._slots == []


def test_an_attention_call_with_grad_enabled_inside_a_step_is_refused():
    """A recompute (the reversible backward's) runs blocks with grad enabled: it must not touch a cache."""
    model = model_of("baseline")
    x = torch.randn(1, 4, 32)
    with torch.no_grad(), KVCache(SEQ_LEN).step(4), torch.enable_grad():
        with pytest.raises(RuntimeError, match="grad-enabled"):
            model.body.blocks[0](x)


def test_a_decode_with_other_attention_calls_than_the_prefill_is_refused():
    model = model_of("baseline")
    block = model.body.blocks[0]
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        cache = KVCache(SEQ_LEN)
        model(prompt((1, 4), "cpu"), cache=cache)               # 3 attention calls
        with pytest.raises(RuntimeError, match="made 1 attention calls but the prefill made 3"):
            with cache.step(1):
                block(x[:, :1])
        with pytest.raises(RuntimeError, match="half-written"):  # the failed step broke it
            model(prompt((1, 1), "cpu"), cache=cache)
        cache = KVCache(SEQ_LEN)
        with cache.step(4):
            block(x)
        with pytest.raises(RuntimeError, match="prefill made only 1"):
            model(prompt((1, 1), "cpu"), cache=cache)
        cache = KVCache(SEQ_LEN)
        model(prompt((1, 4), "cpu"), cache=cache)
        with pytest.raises(RuntimeError, match="same batch"):
            model(prompt((2, 1), "cpu"), cache=cache)


def test_a_cache_step_takes_the_prompt_then_one_token_within_capacity():
    model = model_of("baseline")
    with torch.no_grad():
        cache = KVCache(SEQ_LEN)
        model(prompt((1, 4), "cpu"), cache=cache)
        with pytest.raises(ValueError, match="one new token per step"):
            model(prompt((1, 2), "cpu"), cache=cache)
        with pytest.raises(ValueError, match="exceeds cfg.seq_len"):
            model(prompt((1, 13), "cpu"), cache=cache)
        with pytest.raises(ValueError, match="capacity"):
            KVCache(2).step(3).__enter__()
        with pytest.raises(TypeError, match="cache"):
            model(prompt((1, 4), "cpu"), cache={})
    with pytest.raises(ValueError, match="capacity"):
        KVCache(0)


@pytest.mark.parametrize("use_cache", [1, None, "yes"])
def test_generate_refuses_a_use_cache_that_is_not_a_bool(use_cache):
    with pytest.raises(TypeError, match="use_cache"):
        model_of("baseline").generate(torch.zeros(1, 2, dtype=torch.long), 1, use_cache=use_cache)
