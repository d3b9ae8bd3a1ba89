"""Save and reload a retrofitted Hugging Face model.

On disk a retrofitted model is its source model's checkpoint plus one config field:

- weights under the source model's own names (`model.layers.{j}.self_attn.q_proj.weight`,
  `transformer.h.{j}.attn.c_attn.weight`, ...): the student keeps its layers where the source had
  them, and its RetrofitStack holds no weights (a is configuration);
- `config.json["revkernels_retrofit"]` = RetrofitStack.config_record() (a per layer, iterations, form,
  exact, state_dtype) plus source_class, source_use_cache and revkernels_version;
- config.json's `use_cache` is the source's (the student runs with False in memory);
- form="linear" only: its corrections g_j as extra weights `<decoder>.retrofit.corrections.{j-1}.weight`
  and `.bias` (e.g. `model.retrofit.corrections.0.weight` is g_1's W), in the same weight files, so
  Trainer's resume (load_state_dict) restores them; the plain class reports them as unexpected keys and
  runs without them (the residual model).

So `revkernels.retrofit.from_pretrained(dir)` rebuilds the same retrofitted model (same logits), and the
plain class (`LlamaForCausalLM.from_pretrained(dir)`) loads every weight, nothing missing or
re-initialised, and computes the residual teacher architecture p[j+1] = p[j] + f_j(p[j]) with the
student's weights (what `unretrofit(student)` gives; not the student's outputs). A student retrofitted
from a GGUF file saves as an ordinary checkpoint (hf.drop_gguf_quantizer).
"""
import functools
import json

from .core import RetrofitStack, retrofit_stack
from .hf import CONFIG_KEY, retrofit_hf, revkernels_version

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
               "trust_remote_code")


def save_pretrained(self, save_directory, *args, **kwargs):
    """`PreTrainedModel.save_pretrained` of a retrofitted model: config.json with the stack's current
    record (a may have changed since the retrofit: set_a, calibration) and the source's use_cache.
    Every argument passes through."""
    info = getattr(self.config, CONFIG_KEY)
    record = {**retrofit_stack(self).config_record(), "source_class": info["source_class"],
              "source_use_cache": info["source_use_cache"], "revkernels_version": revkernels_version()}
    setattr(self.config, CONFIG_KEY, record)
    saved = self.config.use_cache
    if record["source_use_cache"] is not None:       # the plain class gets its cache back
        self.config.use_cache = record["source_use_cache"]
    try:
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    finally:
        self.config.use_cache = saved


def _load_corrections(student, path, kwargs):
    """Load form='linear''s corrections g_j from the checkpoint's safetensors weight files (a local folder
    or a hub id; sharded or not): the source class's from_pretrained drops them as unexpected keys.
    ValueError if any is missing (the student would silently run with g_j = 0)."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    stack = retrofit_stack(student)
    prefix = next(n for n, m in student.named_modules() if m is stack) + ".corrections."
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub)
    if index is not None:
        with open(index) as fh:
            files = sorted({f for k, f in json.load(fh)["weight_map"].items() if k.startswith(prefix)})
    else:
        files = ["model.safetensors"]
    found = {}
    for name in files:
        local = cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub)
        if local is None:
            continue
        with safe_open(local, "pt", device="cpu") as fh:
            found.update({k[len(prefix):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)})
    missing = sorted(set(stack.corrections.state_dict()) - set(found))
    if missing:
        raise ValueError(f"{path}: the checkpoint is form='linear' but its safetensors weights lack "
                         f"{len(missing)} correction tensors ({prefix}{missing[0]}, ...); save it with the "
                         "student's save_pretrained")
    stack.corrections.load_state_dict(found)


def install(student):
    """Bind `save_pretrained` above on the student instance; the class keeps transformers' own. A
    functools.partial, not a bound method, so that deepcopy and pickle keep it bound to the copy."""
    student.save_pretrained = functools.partial(save_pretrained, student)


def from_pretrained(pretrained_model_name_or_path, **kwargs):
    """The retrofitted model saved by `student.save_pretrained(dir)` (or a Trainer checkpoint of it).

    Reads `revkernels_retrofit` from config.json, loads the source class (`LlamaForCausalLM`, ...) with
    `from_pretrained(pretrained_model_name_or_path, **kwargs)` (dtype, device_map, local_files_only
    and the like pass through) and retrofits it in place with the recorded configuration
    (`RetrofitStack.kwargs_from_record`): the same model, same logits. A checkpoint without that field
    is refused (retrofit a plain model with `revkernels.retrofit(model, ...)`).
    """
    import transformers

    config = kwargs.pop("config", None)
    if config is None:
        config = transformers.AutoConfig.from_pretrained(
            pretrained_model_name_or_path, **{k: v for k, v in kwargs.items() if k in _HUB_KWARGS})
    info = getattr(config, CONFIG_KEY, None)
    if not isinstance(info, dict):
        raise ValueError(f"{pretrained_model_name_or_path}: config.json has no {CONFIG_KEY!r} field, so it is "
                         "not a retrofitted checkpoint; load it with transformers and call "
                         "revkernels.retrofit(model, ...)")
    name = info.get("source_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{pretrained_model_name_or_path}: source class {name!r} is not a transformers model class")
    model = cls.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
    kwargs_stack = RetrofitStack.kwargs_from_record(info)
    kwargs_stack.pop("width", None)                  # the adapter reads d from the model's config
    student = retrofit_hf(model, inplace=True, **kwargs_stack)
    if info.get("form") == "linear":
        _load_corrections(student, pretrained_model_name_or_path, kwargs)
    install(student)
    return student

