"""Which Hugging Face models the retrofit accepts, found by structure, not by class name.

A model is accepted when it is a decoder-only causal LM (or its base model) whose decoder runs a plain
residual layer loop

    h = embed(ids);  for layer in layers: h = layer(h, **per-layer arguments);  out = head(norm(h))

with `layers` an nn.ModuleList of config.num_hidden_layers layers that take the hidden state as their
first argument. The decoder is `model.get_decoder()` (or `getattr(model, model.base_model_prefix)`), and
the layer list is the one child ModuleList of it with num_hidden_layers entries. Llama, Mistral, Qwen2,
Qwen3, Gemma 2, Gemma 3 (text), Phi-3, OLMo, GPT-2 and GPT-NeoX are tested (tests/test_hf_families.py);
none of them needed a family-specific entry: their per-layer differences (sliding or global mask,
Gemma 3's rotary table per layer type) are arguments of the layer call, which hf.py records per layer.

A model that breaks the convention is refused with a TypeError saying why: here (encoder-decoder,
cross attention, no layer list), or at the first forward (hf.py: a loop that changes the hidden state
between layers or skips a layer, a layer that changes the hidden state's shape).
"""
import inspect

from torch import nn

def text_config(model):
    """The decoder's config (the text config of a multimodal config)."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def decoder(model):
    """The module that runs the layer loop: model.get_decoder(), else the base model."""
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    if dec is None:
        dec = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    return dec


def find_layers(model):
    """(decoder, name of its layer list, the first num_hidden_layers layers) of a supported model;
    TypeError saying why otherwise."""
    name = f"{type(model).__module__}.{type(model).__name__}"
    config = text_config(model)
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError(f"retrofit does not support {name}: it is an encoder-decoder model; only decoder-only "
                        "causal LMs are retrofitted")
    if getattr(config, "add_cross_attention", False):
        raise TypeError(f"retrofit does not support {name} with add_cross_attention=True: its layers attend to "
                        "an encoder (cross attention), not only to the residual state")
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise TypeError(f"retrofit does not support {name}: its config has no num_hidden_layers")
    dec = decoder(model)
    lists = [(child_name, child) for child_name, child in dec.named_children()
             if isinstance(child, nn.ModuleList) and len(child) >= n]
    exact = [(k, v) for k, v in lists if len(v) == n]
    found = exact if exact else lists
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(k for k, _ in found)})"
        raise TypeError(f"retrofit does not support {name}: its decoder {type(dec).__name__} has {what} layer "
                        f"lists (nn.ModuleList children with num_hidden_layers={n} entries), so there is no "
                        "residual layer loop to retrofit")
    list_name, layer_list = found[0]
    layers = list(layer_list)[:n]
    for j, layer in enumerate(layers):
        params = [p for p in inspect.signature(layer.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        if not params:
            raise TypeError(f"retrofit does not support {name}: layer {j} ({type(layer).__name__}) does not take "
                            "the hidden state as its first argument")
    return dec, list_name, layers


def cache_layer_kwargs(model):
    """Per source layer, (type name, kwargs) of its DynamicCache layer (sliding or full attention), as
    transformers builds them for `DynamicCache(config=...)`."""
    from transformers.cache_utils import get_layer_types_and_kwargs
    types, kwargs = get_layer_types_and_kwargs(text_config(model))
    return list(zip(types, kwargs))
