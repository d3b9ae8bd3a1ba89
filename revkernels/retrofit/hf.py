"""Hugging Face adapters: run a GPT-2 / Llama decoder's layer loop as a RetrofitStack.

The base model's forward is kept as it is (embeddings, causal / padding mask, rotary tables, final
norm, LM head, loss): its layer list is replaced by a one-element list holding `HFRetrofitLayers`, which
the base model calls once, like its first layer, with the per-forward keyword arguments. Those become
the context of every block call: f_j(p) = layer_j(p, **context) - p.

Targets transformers 5.x, where a decoder layer returns the hidden-state tensor (older versions return
a tuple; its first element is taken). Saving and reloading: hf_checkpoint.py.

`gradient_checkpointing_enable()` / `activation_checkpointing_enable()` (also what `Trainer` calls for
`gradient_checkpointing=True`) are bound on the student instance to a no-op that warns (once per call): the
reversible backward already recomputes each block from the two stored states, so activation memory is
flat in depth without it, and checkpointing on top recomputes every block a second time (measured
1.70x step time on GPT-2, 1.85x on Llama, same gradients).
"""
import copy
import functools
import inspect
import warnings

import torch
from torch import nn

from . import hf_checkpoint
from .core import RetrofitStack, SUPPORTED

# class name -> (attribute of the base model inside it or None, name of the layer list on the base)
_LAYOUT = {
    "GPT2LMHeadModel": ("transformer", "h"),
    "GPT2Model": (None, "h"),
    "LlamaForCausalLM": ("model", "layers"),
    "LlamaModel": (None, "layers"),
}


def is_transformers_model(model):
    return type(model).__module__.startswith("transformers.")


def _supported_class(model):
    """The supported transformers class `model` is an instance of (exact class name match)."""
    import transformers
    for name in _LAYOUT:
        cls = getattr(transformers, name, None)
        if cls is not None and type(model) is cls:
            return name
    raise TypeError(f"retrofit does not support {type(model).__module__}.{type(model).__name__}: "
                    f"supported are {', '.join(SUPPORTED)}")


def _base(model, name):
    attr, _ = _LAYOUT[name]
    return getattr(model, attr) if attr else model


class HFLayerUpdate(nn.Module):
    """f(p) = layer(p, **context) - p for a Hugging Face decoder layer. The layer runs in its own
    dtype; the update is returned in p's dtype (the reversible state's, fp32 by default)."""

    takes_context = True

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, p, context):
        dtype = next((t.dtype for t in self.layer.parameters() if t.is_floating_point()), p.dtype)
        h = p if p.dtype == dtype or torch.is_autocast_enabled(p.device.type) else p.to(dtype)
        out = self.layer(h, **context)
        if isinstance(out, tuple):          # transformers < 5 returns (hidden_states, ...)
            out = out[0]
        return out.to(p.dtype) - h.to(p.dtype)


class HFRetrofitLayers(nn.Module):
    """Stands in for a decoder's whole layer list: called like its first layer, returns the last
    hidden state of the retrofitted stack."""

    def __init__(self, layers, a, iterations, state_dtype, functional_dropout=False):
        super().__init__()
        self.stack = RetrofitStack([HFLayerUpdate(layer) for layer in layers], a, iterations,
                                   state_dtype=state_dtype)
        self.functional_dropout = functional_dropout
        self._signature = inspect.signature(layers[0].forward)

    def context(self, hidden_states, args, kwargs):
        """The first layer's keyword arguments for this call, KV cache and cross attention refused."""
        layer = self.stack.updates[0].layer
        bound = self._signature.bind(hidden_states, *args, **kwargs)
        ctx = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if kind == inspect.Parameter.VAR_KEYWORD:
                ctx.update(value)
            elif kind == inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"{type(layer).__name__} got unexpected positional arguments")
            elif name != "hidden_states":
                ctx[name] = value
        if ctx.get("past_key_values") is not None or ctx.get("layer_past") is not None:
            raise NotImplementedError(
                "a retrofitted model does not support the KV cache (the reversible stack recomputes "
                "blocks): call it with use_cache=False (also generate(..., use_cache=False))")
        if ctx.get("encoder_hidden_states") is not None:
            raise NotImplementedError("a retrofitted model does not support cross attention")
        ctx["use_cache"] = False
        return ctx

    def forward(self, hidden_states, *args, **kwargs):
        # Dropout that "auto" cannot see (functional, e.g. Llama's attention_dropout): replay RNG.
        self.stack.preserve_rng_state = True if self.functional_dropout and self.training else "auto"
        return self.stack(hidden_states, self.context(hidden_states, args, kwargs))


CHECKPOINTING_IS_A_NO_OP = (
    "gradient checkpointing stays off on a retrofitted model: its reversible backward already recomputes "
    "every block from two stored states (activation memory flat in depth), and checkpointing on top "
    "would recompute each block again (measured 1.70x step time on GPT-2, 1.85x on Llama, same "
    "gradients). This call does nothing.")


def _checkpointing_is_a_no_op(self, *args, **kwargs):
    """gradient_checkpointing_enable / activation_checkpointing_enable of a retrofitted model."""
    warnings.warn(CHECKPOINTING_IS_A_NO_OP, UserWarning, stacklevel=2)


_CHECKPOINTING_ENTRY_POINTS = ("gradient_checkpointing_enable", "activation_checkpointing_enable")


def retrofit_hf(model, a, iterations, state_dtype, *, inplace=False):
    """The retrofitted student of a supported transformers model (a deep copy, or `model` itself
    converted in place when inplace=True, as `from_pretrained` does)."""
    name = _supported_class(model)
    config = model.config
    if getattr(config, "add_cross_attention", False):
        raise ValueError(f"{name} with add_cross_attention=True is not supported")
    student = model if inplace else copy.deepcopy(model)
    flag = "is_activation_checkpointing" if hasattr(type(student), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    if getattr(student, flag, False):
        student.gradient_checkpointing_disable()     # the reversible backward already recomputes
    base = _base(student, name)
    _, list_name = _LAYOUT[name]
    layers = list(getattr(base, list_name))
    n = getattr(config, "num_hidden_layers", len(layers))
    layers = layers[:n]
    functional_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0
    driver = HFRetrofitLayers(layers, a, iterations, state_dtype, functional_dropout)
    layer_list = nn.ModuleList([driver])
    layer_list.register_load_state_dict_pre_hook(hf_checkpoint.accept_source_names)
    setattr(base, list_name, layer_list)
    setattr(student.config, hf_checkpoint.CONFIG_KEY, {
        "a": driver.stack.a.tolist(), "iterations": iterations, "state_dtype": str(state_dtype).split(".")[-1],
        "source_class": name, "source_use_cache": getattr(student.config, "use_cache", None),
        "revkernels_version": hf_checkpoint.revkernels_version()})
    student.config.use_cache = False
    gen = getattr(student, "generation_config", None)
    if gen is not None and hasattr(gen, "use_cache"):
        gen.use_cache = False
    hf_checkpoint.install(student)
    for entry in _CHECKPOINTING_ENTRY_POINTS:
        setattr(student, entry, functools.partial(_checkpointing_is_a_no_op, student))
    return student


def unretrofit_hf(model):
    name = _supported_class(model)
    plain = copy.deepcopy(model)
    base = _base(plain, name)
    _, list_name = _LAYOUT[name]
    driver = getattr(base, list_name)[0]
    setattr(base, list_name, nn.ModuleList([u.layer for u in driver.stack.updates]))
    for entry in ("save_pretrained", *_CHECKPOINTING_ENTRY_POINTS):
        plain.__dict__.pop(entry, None)
    info = plain.config.__dict__.pop(hf_checkpoint.CONFIG_KEY, {})
    if info.get("source_use_cache") is not None:
        plain.config.use_cache = info["source_use_cache"]
        gen = getattr(plain, "generation_config", None)
        if gen is not None and hasattr(gen, "use_cache"):
            gen.use_cache = info["source_use_cache"]
    return plain
