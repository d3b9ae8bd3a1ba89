"""Hugging Face adapter: run a decoder's layer loop as a RetrofitStack, each layer with its own arguments.

The layers stay where the model keeps them (`model.layers.{j}`, `transformer.h.{j}`, ...), so the
student's state_dict names are the source model's. The decoder (families.decoder) gets

- `retrofit`: the RetrofitStack over f_j(p) = layer_j(p, **kw_j) - p (`LayerUpdate`, which refers to
  the layer without registering it a second time), and
- an instance-level `forward` (`retrofitted_forward`): it runs the decoder's own forward (embeddings,
  masks, rotary tables, final norm) with its layer list shadowed by recorders. Recorder j records the
  arguments the decoder gives layer j (its own mask: sliding or global; its own rotary table: Gemma 3)
  and passes the hidden state through unchanged; the last one runs the stack over the recorded
  per-layer contexts, x = the state the first layer was given:  p[L] = RetrofitStack(x, [kw_0..kw_{L-1}]).
  The layers themselves are called only by the stack, once per block call, so module hooks (FSDP2)
  see exactly the block calls.

KV cache. A `transformers.Cache` among a layer's arguments (found by type, whatever its keyword) is
handed to each block call as a `CacheSlot`: layer indices map to that call's slot (core's contract:
compact, layer j -> slot j; eq4.5 also f_{j-1} at p_hat, L + (j-1)(iterations+1) + i), so no call
overwrites another's keys and values. A DynamicCache built from the config (generate's default) gets
the extra slots, each of its layer's kind (sliding or full attention). A cache while a backward could
follow (grad enabled, a reversible stack, something requiring grad) is refused: the backward's recompute
would call every layer again and write the cache twice. config.use_cache is False (a training forward
builds no cache), generation_config.use_cache keeps the source's (generate uses the cache).

Per-layer `output_hidden_states` / `output_attentions` are recorded by transformers' hooks on the layers,
so they come from the block calls: the embedding, then one per block call (compact: L of them,
layer_j(p[j]) = p[j] + f_j(p[j]); eq4.5 adds the extra calls: measured 8 hidden states for 3 layers and 1
iteration), not the residual model's states; `last_hidden_state` and the logits are the student's.

`gradient_checkpointing_enable()` / `activation_checkpointing_enable()` (also what `Trainer` calls for
`gradient_checkpointing=True`) are bound on the student instance to a no-op that warns (once per call): the
reversible backward already recomputes each block from the two stored states, so activation memory is
flat in depth without it, and checkpointing on top recomputes every block a second time (measured
1.70x step time on GPT-2, 1.85x on Llama, same gradients).

FSDP2: the layers are the blocks, `for layer in decoder.<layers>: fully_shard(layer)`, then
`fully_shard(model)` (e.g. `model.model.layers` for Llama-like models, `model.transformer.h` for GPT-2).
"""
import copy
import functools
import importlib.metadata
import inspect
import warnings
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import families
from .core import RetrofitStack, block_call_slot, block_calls, cast_for

STACK_NAME = "retrofit"


def is_transformers_model(model):
    return type(model).__module__.startswith("transformers.")


# ------------------------------------------------------------------ one layer call's arguments

class LayerCall(NamedTuple):
    """The arguments a decoder gave one layer in one forward, hidden state excluded: `kwargs` (positional
    ones bound to their names), `args` (extra positional ones), and `cache_key`, the keyword holding a
    transformers Cache (None without one)."""
    args: tuple
    kwargs: dict
    cache_key: Optional[str]


def bind_call(signature, hidden_states, args, kwargs) -> LayerCall:
    """LayerCall of layer(hidden_states, *args, **kwargs); the Cache is found by type."""
    from transformers.cache_utils import Cache
    bound = signature.bind(hidden_states, *args, **kwargs)
    params = signature.parameters
    first = next(iter(params))
    named, extra = {}, ()
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if name == first:
            continue
        if kind == inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            extra = tuple(value)
        else:
            named[name] = value
    if any(isinstance(v, Cache) for v in extra):
        raise NotImplementedError("a layer got its KV cache as an extra positional argument: the retrofit "
                                  "cannot give each block call its own cache slot; pass use_cache=False")
    keys = [k for k, v in named.items() if isinstance(v, Cache)]
    if len(keys) > 1:
        raise NotImplementedError(f"a layer got {len(keys)} caches ({', '.join(keys)}); the retrofit gives one "
                                  "cache slot per block call: pass use_cache=False")
    if named.get("encoder_hidden_states") is not None:
        raise NotImplementedError("a retrofitted model does not support cross attention (encoder_hidden_states)")
    return LayerCall(extra, named, keys[0] if keys else None)


class CacheSlot:
    """The KV cache as one block call sees it: every layer index maps to `slot`, so each block call
    reads and writes its own entry. Methods that take no layer index are not forwarded (AttributeError
    naming them) rather than guessed."""

    def __init__(self, cache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.slot, *args, **kwargs)

    def get_seq_length(self, layer_idx=0):
        return self.cache.get_seq_length(self.slot)

    def get_mask_sizes(self, query_length, layer_idx=0):
        return self.cache.get_mask_sizes(query_length, self.slot)

    def get_max_length(self, layer_idx=None):
        return self.cache.get_max_length(self.slot)

    def __getattr__(self, name):
        raise AttributeError(f"{type(self.cache).__name__}.{name} is not available to a retrofitted layer: the "
                             "retrofit maps only update/get_seq_length/get_mask_sizes/get_max_length to the "
                             "block call's cache slot")


class LayerUpdate(nn.Module):
    """f(p) = layer(p, **its recorded arguments) - p, for a layer the model keeps where it was.

    The layer is referred to, not registered again (the state_dict keeps one name per weight, the
    source's), but named_modules() and so parameters() / modules() include it: the reversible stack
    takes gradients of the parameters a block uses and finds FSDP2 modules in it. Traversals from the
    model reach the layer under its own name first. The layer runs in its own dtype; the update is
    returned in p's dtype (the reversible state's, fp32 by default)."""

    takes_context = True

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "layer", layer)

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        if memo is None:
            memo = set()
        if remove_duplicate:
            if self in memo:
                return
            memo.add(self)
        yield prefix, self
        yield from self.layer.named_modules(memo, prefix + ("." if prefix else "") + "layer", remove_duplicate)

    def forward(self, p, call: LayerCall, slot: int):
        h = cast_for(self.layer, p)
        kwargs = call.kwargs
        if call.cache_key is not None:
            kwargs = {**kwargs, call.cache_key: CacheSlot(kwargs[call.cache_key], slot)}
        out = self.layer(h, *call.args, **kwargs)
        if isinstance(out, tuple):          # layers of transformers < 5 return (hidden_states, ...)
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.shape != h.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"{type(self.layer).__name__} maps the hidden state {tuple(h.shape)} to {got}: only "
                            "layers that keep the hidden state's shape (residual layers) can be retrofitted")
        return out.to(p.dtype) - h.to(p.dtype)


# ------------------------------------------------------------------ the decoder's forward

class _Recorder:
    """Stands in for layer j in the decoder's loop (module docstring). Attribute reads reach the layer."""

    def __init__(self, run, j, layer):
        self._run, self._j, self._layer = run, j, layer

    def __call__(self, hidden_states, *args, **kwargs):
        return self._run.record(self._j, hidden_states, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._layer, name)


class _LoopRun:
    """One forward of the decoder's layer loop: the recorded calls, then the stack."""

    def __init__(self, decoder, stack):
        self.decoder, self.stack = decoder, stack
        self.layers = [u.layer for u in stack.updates]
        self.calls, self.x, self.x_version, self.done = [], None, None, False

    def recorders(self):
        return [_Recorder(self, j, layer) for j, layer in enumerate(self.layers)]

    def record(self, j, hidden_states, args, kwargs):
        n = len(self.layers)
        if j != len(self.calls) or self.done:
            raise TypeError(f"{type(self.decoder).__name__} called layer {j} after {len(self.calls)} layer calls: "
                            "only a loop calling every layer once, in order, can be retrofitted")
        if j == 0:
            self.x, self.x_version = hidden_states, hidden_states._version
        elif hidden_states is not self.x or hidden_states._version != self.x_version:
            raise TypeError(f"{type(self.decoder).__name__} changes the hidden state between layers {j - 1} and {j}: "
                            "only a plain residual loop h = layer(h, ...) can be retrofitted")
        self.calls.append(bind_call(inspect.signature(self.layers[j].forward), hidden_states, args, kwargs))
        if j < n - 1:
            return hidden_states
        self._prepare_cache()
        self.done = True
        return self.stack(self.x, list(self.calls))

    def _prepare_cache(self):
        """Refuse a cache a backward could write twice; give a config-built DynamicCache one layer per slot."""
        caches = {id(c.kwargs[c.cache_key]): c.kwargs[c.cache_key] for c in self.calls if c.cache_key}
        if not caches:
            return
        if len(caches) > 1 or any(c.cache_key is None for c in self.calls):
            raise NotImplementedError("the layers got different caches (or only some of them one): the retrofit "
                                      "needs one cache for every layer, or none")
        cache = next(iter(caches.values()))
        stack = self.stack
        if torch.is_grad_enabled() and stack.reversible and (
                self.x.requires_grad or any(p.requires_grad for p in stack.parameters())):
            raise NotImplementedError(
                f"a KV cache ({type(cache).__name__}) was passed to a retrofitted model with gradients enabled: its "
                "reversible backward recomputes every layer, which would write the cache a second time. Train "
                "with use_cache=False; decode under torch.no_grad() (generate does), or set "
                "retrofit_stack(model).reversible = False")
        fit_cache(cache, self.decoder, stack)

    def finish(self):
        if not self.done:
            raise TypeError(f"{type(self.decoder).__name__} called {len(self.calls)} of its {len(self.layers)} "
                            "layers: only a loop calling every layer once can be retrofitted")


def slot_layers(n_layers, iterations, form):
    """Per block-call slot, the layer whose block it calls (core's slot contract)."""
    out = [None] * block_calls(n_layers, iterations, form)
    for j in range(n_layers):
        out[block_call_slot(n_layers, iterations, form, j)] = j
        if form == "eq4.5" and j > 0:
            for i in range(iterations + 1):
                out[block_call_slot(n_layers, iterations, form, j, i)] = j - 1
    return out


def fit_cache(cache, decoder, stack):
    """Give `cache` one layer per block-call slot, each slot's layer of its block's kind (sliding window
    or full attention). A cache that grows by itself (DynamicCache() without config) needs nothing."""
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, DynamicCache
    owners = slot_layers(len(stack.updates), stack.iterations, stack.form)
    have = len(cache.layers)
    if have > len(owners):
        raise ValueError(f"the cache has {have} layers but this student makes {len(owners)} block calls per forward "
                         f"(form={stack.form!r}, iterations={stack.iterations}): it was not filled by this student")
    if have == len(owners) or getattr(cache, "layer_class_to_replicate", None) is not None:
        return
    if not isinstance(cache, DynamicCache):
        raise NotImplementedError(
            f"{type(cache).__name__} has {have} layers but this student makes {len(owners)} block calls per forward "
            f"(form={stack.form!r}, iterations={stack.iterations}), one cache slot each: use a DynamicCache "
            "(generate's default), or form='compact'")
    if cache.get_seq_length() > 0:
        raise ValueError(f"the cache holds {cache.get_seq_length()} tokens in {have} layers but this student needs "
                         f"{len(owners)} slots: it was not filled by this student; start from an empty cache")
    kinds = families.cache_layer_kwargs(decoder)
    for slot in range(have, len(owners)):
        kind, kwargs = kinds[owners[slot]]
        cache.layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))


def retrofitted_forward(decoder, list_name, *args, **kwargs):
    """The decoder's own forward with its layer list shadowed by recorders (module docstring)."""
    run = _LoopRun(decoder, getattr(decoder, STACK_NAME))
    decoder.__dict__[list_name] = run.recorders()    # shadows _modules[list_name] for attribute reads only
    try:
        out = type(decoder).forward(decoder, *args, **kwargs)
    finally:
        del decoder.__dict__[list_name]
    run.finish()
    return out


# ------------------------------------------------------------------ conversion

CHECKPOINTING_IS_A_NO_OP = (
    "gradient checkpointing stays off on a retrofitted model: its reversible backward already recomputes "
    "every block from two stored states (activation memory flat in depth), and checkpointing on top "
    "would recompute each block again (measured 1.70x step time on GPT-2, 1.85x on Llama, same "
    "gradients). This call does nothing.")


def _checkpointing_is_a_no_op(self, *args, **kwargs):
    """gradient_checkpointing_enable / activation_checkpointing_enable of a retrofitted model."""
    warnings.warn(CHECKPOINTING_IS_A_NO_OP, UserWarning, stacklevel=2)


_CHECKPOINTING_ENTRY_POINTS = ("gradient_checkpointing_enable", "activation_checkpointing_enable")
CONFIG_KEY = "revkernels_retrofit"


def drop_gguf_quantizer(model):
    """A GGUF-loaded model holds plain dequantized weights but keeps transformers' GGUF quantizer, which
    refuses save_pretrained ("quantized with gguf and is not serializable"): remove the marker so the
    model saves as an ordinary checkpoint in its weights' dtype. Other quantizers are left alone."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or getattr(method, "value", method) != "gguf":
        return
    model.hf_quantizer = None
    model.__dict__.pop("quantization_method", None)
    model.__dict__.pop("is_quantized", None)
    model.config.__dict__.pop("quantization_config", None)


def revkernels_version():
    try:
        return importlib.metadata.version("revkernels")
    except importlib.metadata.PackageNotFoundError:   # a source tree that was never installed
        return "unknown"


def source_record(model):
    """The config.json fields a retrofit adds besides the stack's own record."""
    return {"source_class": type(model).__name__, "source_use_cache": getattr(model.config, "use_cache", None),
            "revkernels_version": revkernels_version()}


def retrofit_hf(model, a=2 ** -4, iterations=0, *, form="compact", exact=True, state_dtype=torch.float32,
                max_reconstruction_error=None, inplace=False):
    """The retrofitted student of a transformers decoder-only causal LM (a deep copy, or `model` itself
    converted in place when inplace=True, as `from_pretrained` does); a, iterations, form, exact,
    state_dtype, max_reconstruction_error: RetrofitStack's. TypeError saying why for a model that does
    not fit (families.find_layers)."""
    families.find_layers(model)                       # refuse before copying
    if "forward" in getattr(model, "__dict__", {}) or "forward" in families.decoder(model).__dict__:
        raise TypeError(f"{type(model).__name__} has an instance-level forward (accelerate hooks from device_map, "
                        "or another wrapper): retrofit the plain model, then dispatch it")
    student = model if inplace else copy.deepcopy(model)
    decoder, list_name, layers = families.find_layers(student)
    if hasattr(decoder, STACK_NAME):
        raise TypeError(f"{type(decoder).__name__} already has an attribute {STACK_NAME!r}")
    drop_gguf_quantizer(student)
    flag = "is_activation_checkpointing" if hasattr(type(student), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    if getattr(student, flag, False):
        student.gradient_checkpointing_disable()     # the reversible backward already recomputes
    config = families.text_config(student)
    # functional dropout (F.dropout in the attention) that "auto" cannot see: replay the RNG
    functional_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0
    stack = RetrofitStack([LayerUpdate(layer) for layer in layers], a, iterations, form=form, exact=exact,
                          state_dtype=state_dtype, max_reconstruction_error=max_reconstruction_error,
                          preserve_rng_state=True if functional_dropout else "auto",
                          width=_state_width(config) if form == "linear" else None)
    decoder.add_module(STACK_NAME, stack)
    decoder.forward = functools.partial(retrofitted_forward, decoder, list_name)
    setattr(student.config, CONFIG_KEY, {**stack.config_record(), **source_record(student)})
    student.config.use_cache = False                 # a plain forward builds no cache; generate keeps its own
    for entry in _CHECKPOINTING_ENTRY_POINTS:
        setattr(student, entry, functools.partial(_checkpointing_is_a_no_op, student))
    return student


def _state_width(config):
    """d of the hidden state the layers pass on (form='linear' needs it for its d x d corrections)."""
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise TypeError(f"form='linear' needs the hidden size, which {type(config).__name__} does not name "
                    "(hidden_size, n_embd or d_model)")


def unretrofit_hf(model):
    """An ordinary residual copy of a retrofitted transformers model, with its current weights."""
    plain = copy.deepcopy(model)
    decoder = families.decoder(plain)
    del decoder._modules[STACK_NAME]
    del decoder.__dict__["forward"]
    for entry in ("save_pretrained", *_CHECKPOINTING_ENTRY_POINTS):
        plain.__dict__.pop(entry, None)
    info = plain.config.__dict__.pop(CONFIG_KEY, {})
    if info.get("source_use_cache") is not None:
        plain.config.use_cache = info["source_use_cache"]
    return plain
