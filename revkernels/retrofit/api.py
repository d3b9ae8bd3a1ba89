"""`retrofit(model, ...)` and `unretrofit(model)`: dispatch to the model adapters (gpt.py for revkernels
GPT, hf.py for transformers models; hf_checkpoint.py installs save_pretrained on HF students), to
correction.py for form="linear" and to calibrate.py for a="auto". The arrows point down:
api -> {gpt, hf_checkpoint -> hf, correction, calibrate} -> core.
"""
from typing import Sequence, Union

import torch
from torch import nn

from . import gpt, hf, hf_checkpoint
from .core import ACoef, check_form, find_retrofit_stack, retrofit_stack

DEFAULT_A = 2 ** -4
SUPPORTED = ("transformers decoder-only causal LMs whose decoder runs a residual layer loop (families.py)",
             "revkernels GPT (arch 'baseline' or 'checkpoint')")


def retrofit(model: nn.Module, a: Union[ACoef, str] = DEFAULT_A, iterations: int = 0, *, form: str = "compact",
             exact: bool = True, calibration: Union[None, torch.Tensor, Sequence[torch.Tensor]] = None,
             target_kl: float = 0.01, max_reconstruction_error: float = None,
             state_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A reversible copy of the residual `model` (paper section 4), same call signature and outputs.

    Supported: transformers decoder-only causal LMs (see hf.py) and revkernels `GPT` with arch 'baseline'
    or 'checkpoint'. The blocks' weights are deep-copied (the original model is untouched and can serve
    as the frozen teacher), never re-initialised. The body runs as a `RetrofitStack` (core.py; find it
    with `retrofit_stack(student)`: its meter, `reversible` switch, `set_a`, `mean_side_bits`).

    a: a float, per-layer values (L,) or (L, d) (0 refused), or "auto": per-layer dyadic a_j chosen from
    `calibration` ((B, T) token ids or a list of such batches) for the fewest side bits with KL(teacher ||
    student) <= target_kl on it (implies exact=True). form: "compact" (F_j = f_j, one block call per
    layer; the default), "linear" (F_j = f_j + a_j g_j, g_j(p) = W_j p + b_j fitted by ridge regression
    on `calibration`'s teacher states, correction.py: about one side bit fewer for the same KL on SmolLM2,
    for a d x d matmul per layer) or "eq4.5" (F_j = f_j + a_j f_{j-1}(p_hat), `iterations` guarded
    fixed-point steps). exact: bit-exact reversible backward (a dyadic, a = m/2^k costs k side bits per element per
    layer); exact=False is refused where its gradients cannot be trusted (prod_j max(1, 1/|a_j|) > 1e3).
    max_reconstruction_error: raise in the backward beyond it (see `ReversibleStack`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"retrofit expects an nn.Module, got {type(model).__name__}")
    if find_retrofit_stack(model) is not None:
        raise ValueError(f"{type(model).__name__} is already retrofitted")
    check_form(form, iterations)
    auto = isinstance(a, str)
    if auto:
        if a != "auto":
            raise ValueError(f"a must be a number, per-layer values or 'auto', got {a!r}")
        if calibration is None:
            raise ValueError("a='auto' needs calibration=(B, T) token ids (or a list of such batches)")
        if not exact:
            raise ValueError("a='auto' chooses dyadic a_j for exact mode: pass exact=True")
        a = DEFAULT_A
    elif form == "linear" and calibration is None:
        raise ValueError("form='linear' fits its corrections g_j to the teacher's states on calibration=(B, T) "
                         "token ids (or a list of such batches; a few thousand tokens)")
    elif calibration is not None and form != "linear":
        raise ValueError("calibration is only used with a='auto' or form='linear'; pass one or drop calibration")
    kwargs = dict(a=a, iterations=iterations, form=form, exact=exact, state_dtype=state_dtype,
                  max_reconstruction_error=max_reconstruction_error)
    if gpt.is_gpt(model):
        student = gpt.retrofit_gpt(model, **kwargs)
    elif hf.is_transformers_model(model):
        student = hf.retrofit_hf(model, **kwargs)
        hf_checkpoint.install(student)
    else:
        raise TypeError(f"retrofit does not support {type(model).__module__}.{type(model).__name__}: "
                        f"supported are {', '.join(SUPPORTED)}")
    batches = calibration if isinstance(calibration, (list, tuple)) else [calibration]
    if form == "linear":
        from .correction import fit_correction
        fit_correction(student, batches)
    if auto:
        from .calibrate import calibrate_a
        calibrate_a(student, model, batches, target_kl)
    return student


def unretrofit(model: nn.Module) -> nn.Module:
    """An ordinary residual copy of a retrofitted model, with its current weights."""
    retrofit_stack(model)
    if gpt.is_gpt(model):
        return gpt.unretrofit_gpt(model)
    return hf.unretrofit_hf(model)

