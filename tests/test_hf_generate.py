"""KV-cache decoding of retrofitted Hugging Face models (issue 15 items 1 and 3), models the adapter refuses
and why, and GGUF students saving (issue 17 item 1). Tiny Llama / GPT-2 models, and the real checkpoint
(fixture `smollm2`, short prompts)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # conftest sets it too; must precede `import triton`

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import revkernels as rk  # noqa: E402
from revkernels.retrofit import hf, retrofit_stack  # noqa: E402

tr = pytest.importorskip("transformers")
V, T = 64, 10


def llama(n_layer=3, **kw):
    torch.manual_seed(0)
    return tr.LlamaForCausalLM(tr.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=V, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=0,
        initializer_range=0.2, **kw)).eval()


def gpt2(**kw):
    torch.manual_seed(0)
    return tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64,
                                            bos_token_id=0, eos_token_id=1, **kw)).eval()


def ids(B=2, n=T, seed=1):
    return torch.randint(2, V, (B, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the cache

@pytest.mark.parametrize("form, iterations", [("compact", 0), ("eq4.5", 2)])
def test_manual_decoding_with_past_key_values(form, iterations):
    """Prefill, then one token at a time through past_key_values: the logits of the full forward at every
    position (fp32 rounding of attention over cached keys, measured <= 5e-6)."""
    s = rk.retrofit(llama(), a=2 ** -2, form=form, iterations=iterations)
    x = ids()
    with torch.no_grad():
        full = s(x).logits
        out = s(x[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, T):
            out = s(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-4)
    assert out.past_key_values.get_seq_length() == T


def test_cache_refused_when_a_backward_could_follow():
    """The reversible backward recomputes every block call: with a cache it would write it twice.
    Refused before anything is written; the ordinary-autograd reference (reversible=False) and
    decoding without gradients are allowed."""
    s = rk.retrofit(gpt2(), a=2 ** -2).train()
    x = ids()
    cache = tr.DynamicCache(config=s.config)
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        s(x, use_cache=True)
    with pytest.raises(NotImplementedError, match="torch.no_grad"):
        s(x, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 0                               # nothing written
    s.eval()
    retrofit_stack(s).reversible = False
    out = s(x, use_cache=True)
    out.logits.sum().backward()                                      # ordinary autograd: one call per block
    assert out.past_key_values.get_seq_length() == T


def test_training_forward_builds_no_cache_and_generate_uses_one():
    s = rk.retrofit(llama(), a=2 ** -2)
    assert s.config.use_cache is False and s.generation_config.use_cache is True
    assert s(ids()).past_key_values is None


def test_caches_that_cannot_hold_every_slot_are_refused():
    """eq4.5 makes more block calls than the model has layers: a StaticCache (sized for the layers) and a
    cache another model filled (the teacher's; an eq4.5 student's given to a compact one) are refused,
    not written out of place."""
    teacher = llama()
    s = rk.retrofit(teacher, a=2 ** -2, form="eq4.5", iterations=1)
    with pytest.raises(NotImplementedError, match="DynamicCache"):
        s.generate(ids(B=1), max_new_tokens=2, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        filled = teacher(ids(), use_cache=True).past_key_values
        with pytest.raises(ValueError, match="not filled by this student"):
            s(ids(n=1), past_key_values=filled, use_cache=True)
        eq45_cache = s(ids(), use_cache=True).past_key_values                # 3 + 2 * 2 = 7 slots
        with pytest.raises(ValueError, match="not filled by this student"):
            rk.retrofit(teacher, a=2 ** -2)(ids(n=1), past_key_values=eq45_cache, use_cache=True)


# ------------------------------------------------------------------ what the adapter refuses

def test_encoder_decoder_and_cross_attention_are_refused():
    bart = tr.BartForConditionalGeneration(tr.BartConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32))
    with pytest.raises(TypeError, match="encoder-decoder"):
        rk.retrofit(bart)
    with pytest.raises(TypeError, match="cross attention"):
        rk.retrofit(gpt2(add_cross_attention=True))


def test_model_without_a_layer_list_is_refused():
    m = llama()
    m.model.layers = nn.ModuleList(list(m.model.layers)[:2])        # 2 layers for num_hidden_layers=3
    with pytest.raises(TypeError, match="layer lists"):
        rk.retrofit(m)


class _Widen(nn.Module):
    def forward(self, hidden_states, **kwargs):
        return torch.cat([hidden_states, hidden_states], -1)


def test_layer_that_changes_the_hidden_shape_is_refused():
    m = llama()
    m.model.layers[1] = _Widen()
    s = rk.retrofit(m, a=2 ** -2)
    with pytest.raises(TypeError, match="keep the hidden state's shape"):
        s(ids())


class _ScalingLlama(tr.LlamaModel):
    """A decoder whose loop is not residual: it rescales the state between layers."""

    def forward(self, input_ids, **kwargs):
        h = self.embed_tokens(input_ids)
        pos = torch.arange(h.shape[1])[None]
        rot = self.rotary_emb(h, position_ids=pos)
        for layer in self.layers:
            h = 0.5 * layer(h, position_embeddings=rot, position_ids=pos)
        return h


class _InPlaceScalingLlama(_ScalingLlama):
    """The same, rescaling in place: the state the recorders see is the same tensor object."""

    def forward(self, input_ids, **kwargs):
        h = self.embed_tokens(input_ids)
        pos = torch.arange(h.shape[1])[None]
        rot = self.rotary_emb(h, position_ids=pos)
        for layer in self.layers:
            h = layer(h, position_embeddings=rot, position_ids=pos)
            h.mul_(0.5)
        return h


@pytest.mark.parametrize("decoder", [_ScalingLlama, _InPlaceScalingLlama])
def test_loop_that_changes_the_state_between_layers_is_refused(decoder):
    torch.manual_seed(0)
    m = decoder(llama().config)
    s = hf.retrofit_hf(m, a=2 ** -2)
    with torch.no_grad(), pytest.raises(TypeError, match="changes the hidden state between layers"):
        s(ids())


# ------------------------------------------------------------------ the real checkpoint

PROMPT = "The GNU General Public License is"




@pytest.mark.usefixtures("fallback_ops")
@pytest.mark.parametrize("form, iterations", [("compact", 0), ("eq4.5", 1)])
def test_real_checkpoint_generates_the_same_tokens_with_the_cache(smollm2, form, iterations):
    """SmolLM2-135M, default retrofit (exact, a = 2^-4) and eq4.5: greedy 16 tokens, cache on (default)
    and off, identical."""
    teacher, tok = smollm2
    s = rk.retrofit(teacher, form=form, iterations=iterations)
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    with_cache = s.generate(prompt, max_new_tokens=16, do_sample=False)
    without = s.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)
    assert with_cache.shape[1] == prompt.shape[1] + 16
    assert torch.equal(with_cache, without), (tok.decode(with_cache[0]), tok.decode(without[0]))


@pytest.mark.usefixtures("fallback_ops")
def test_gguf_student_saves_and_reloads(smollm2, tmp_path):
    """A student of the GGUF-loaded checkpoint saves as an ordinary fp32 checkpoint (was: "The model is
    quantized with gguf and is not serializable") and reloads with identical logits."""
    teacher, tok = smollm2
    assert teacher.hf_quantizer is not None                         # the fixture is GGUF-loaded
    s = rk.retrofit(teacher)
    s.save_pretrained(tmp_path)
    back = rk.retrofit.from_pretrained(tmp_path)
    assert getattr(back, "hf_quantizer", None) is None and "quantization_config" not in back.config.to_dict()
    x = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, s(x).logits, rtol=0, atol=0)
