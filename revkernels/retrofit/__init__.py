"""Retrofit pre-trained residual models into reversible ones (paper section 4).

    student = revkernels.retrofit(model)                # exact, compact form, a = 2^-4: same call signature
    kl = retrofit_kl(student_logits, teacher_logits)    # eq. 4.6
    log = align(student, teacher, batches, steps=100)   # fine-tuning to the teacher, tqdm bar, KL log
    student.save_pretrained(d); from_pretrained(d)      # Hugging Face models: the same student back

This package is itself callable: `revkernels.retrofit(model, ...)` is `revkernels.retrofit.api.retrofit`,
and every helper is an attribute of it (`revkernels.retrofit.align`, `.find_retrofit_stack`, ...).
`python -m revkernels.retrofit --model DIR --out DIR ...` runs the alignment from the command line.
"""
import inspect
import sys
import types

from . import api
from .align import align, evaluate_kl, model_logits, retrofit_kl
from .api import retrofit, unretrofit
from .correction import fit_correction
from .core import (RetrofitBlock, RetrofitStack, block_call_slot, block_calls, find_retrofit_stack,
                   retrofit_stack)
from .hf_checkpoint import from_pretrained


class _CallableModule(types.ModuleType):
    """The package's module type: calling the package calls `api.retrofit`, and `inspect.signature` of the
    package (help, IDEs, keyword checks) is api.retrofit's, not (*args, **kwargs)."""

    def __call__(self, *args, **kwargs):
        return api.retrofit(*args, **kwargs)

    @property
    def __signature__(self):
        return inspect.signature(api.retrofit)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["retrofit", "retrofit_kl", "align", "evaluate_kl", "model_logits", "RetrofitBlock", "RetrofitStack",
           "block_calls", "block_call_slot", "find_retrofit_stack", "retrofit_stack", "unretrofit",
           "from_pretrained"]
