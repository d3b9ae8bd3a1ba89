"""Save and reload a retrofitted Hugging Face model.

On disk a retrofitted model is its source model's checkpoint plus one config field:

- weights under the source model's own names: layer j's `transformer.h.{j}.attn.c_attn.weight`
  (GPT-2) or `model.layers.{j}.self_attn.q_proj.weight` (Llama), not the in-memory names
  `transformer.h.0.stack.updates.{j}.layer.attn.c_attn.weight`;
- `config.json["revkernels_retrofit"]`: a (per layer), iterations, state_dtype, the source class, the
  source's use_cache and the revkernels version.

So `revkernels.retrofit.from_pretrained(dir)` rebuilds the same retrofitted model, and the plain class
(`GPT2LMHeadModel.from_pretrained(dir)`) loads every weight, with nothing missing or re-initialised,
and computes the residual teacher architecture p[j+1] = p[j] + f_j(p[j]) with the student's weights
(what `unretrofit(student)` gives; not the student's outputs).

In memory nothing is renamed: `state_dict()` and `named_parameters()` keep the module names (what
torch.distributed.checkpoint and optimizers key on). The renaming happens in the student's
`save_pretrained` (which `Trainer` checkpoints also call, passing `self.model.state_dict()`), and
`load_state_dict` accepts both namings (Trainer's `resume_from_checkpoint` loads through it).
"""
import functools
import importlib.metadata
import re

import torch

CONFIG_KEY = "revkernels_retrofit"
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
               "trust_remote_code")


def revkernels_version():
    try:
        return importlib.metadata.version("revkernels")
    except importlib.metadata.PackageNotFoundError:   # a source tree that was never installed
        return "unknown"


def _driver_prefix(model):
    """'transformer.h.0.': the name of the module standing in for the layer list, with its dot."""
    from .core import RetrofitStack
    for name, module in model.named_modules():
        if isinstance(module, RetrofitStack):
            return name[:-len("stack")]
    raise ValueError(f"{type(model).__name__} is not a retrofitted model")


def source_names(model, state_dict):
    """A copy of `state_dict` with the retrofitted layers under the source model's names:
    {list}.0.stack.updates.{j}.layer.{name} -> {list}.{j}.{name}."""
    prefix = _driver_prefix(model)
    list_prefix = prefix[:-len("0.")]
    pattern = re.compile(re.escape(prefix) + r"stack\.updates\.(\d+)\.layer\.(.+)")
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            match = pattern.fullmatch(key)
            if match is None:
                raise ValueError(f"state_dict key {key!r} is not a weight of a retrofitted layer")
            key = f"{list_prefix}{match[1]}.{match[2]}"
        out[key] = value
    return out


def accept_source_names(module, state_dict, prefix, *_):
    """load_state_dict pre-hook of the retrofitted layer list (at `prefix`, e.g. 'transformer.h.'):
    moves the source model's keys {prefix}{j}.{name} to {prefix}0.stack.updates.{j}.layer.{name}, so
    a checkpoint saved by `save_pretrained` (or by the source model) loads; in-memory names pass."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "0.stack.")]:
        match = pattern.fullmatch(key)
        if match is not None:
            state_dict[f"{prefix}0.stack.updates.{match[1]}.layer.{match[2]}"] = state_dict.pop(key)


def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
    """`PreTrainedModel.save_pretrained` of a retrofitted model: the weights under the source model's
    names (state_dict, default `self.state_dict()`, renamed by `source_names`), config.json with the
    source's use_cache and the `revkernels_retrofit` field. Other arguments pass through."""
    state_dict = source_names(self, self.state_dict() if state_dict is None else state_dict)
    use_cache = getattr(self.config, CONFIG_KEY)["source_use_cache"]
    gen = getattr(self, "generation_config", None)
    saved = self.config.use_cache, getattr(gen, "use_cache", None)
    if use_cache is not None:              # the plain class gets its cache back; retrofit turns it off
        self.config.use_cache = use_cache
        if gen is not None:
            gen.use_cache = use_cache
    try:
        return type(self).save_pretrained(self, save_directory, *args, state_dict=state_dict, **kwargs)
    finally:
        self.config.use_cache = saved[0]
        if gen is not None:
            gen.use_cache = saved[1]


def install(student):
    """Bind `save_pretrained` above on the student instance; the class keeps transformers' own. A
    functools.partial, not a bound method, so that deepcopy and pickle keep it bound to the copy."""
    student.save_pretrained = functools.partial(save_pretrained, student)


def from_pretrained(pretrained_model_name_or_path, **kwargs):
    """The retrofitted model saved by `student.save_pretrained(dir)` (or a Trainer checkpoint of it).

    Reads `revkernels_retrofit` from config.json, loads the source class (`GPT2LMHeadModel`, ...) with
    `from_pretrained(pretrained_model_name_or_path, **kwargs)` (dtype, device_map, local_files_only
    and the like pass through) and retrofits it in place with the recorded a, iterations and
    state_dtype: the same model, same logits. A checkpoint without that field is refused (retrofit
    a plain model with `revkernels.retrofit(model, a, iterations)`).
    """
    import transformers

    from .hf import _LAYOUT, retrofit_hf
    config = kwargs.pop("config", None)
    if config is None:
        config = transformers.AutoConfig.from_pretrained(
            pretrained_model_name_or_path, **{k: v for k, v in kwargs.items() if k in _HUB_KWARGS})
    info = getattr(config, CONFIG_KEY, None)
    if not isinstance(info, dict):
        raise ValueError(f"{pretrained_model_name_or_path}: config.json has no {CONFIG_KEY!r} field, so it is "
                         "not a retrofitted checkpoint; load it with transformers and call "
                         "revkernels.retrofit(model, a=..., iterations=...)")
    name = info.get("source_class")
    if name not in _LAYOUT:
        raise ValueError(f"{pretrained_model_name_or_path}: source class {name!r} is not supported "
                         f"(supported: {', '.join(_LAYOUT)})")
    model = getattr(transformers, name).from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
    return retrofit_hf(model, info["a"], info["iterations"], getattr(torch, info["state_dtype"]), inplace=True)
