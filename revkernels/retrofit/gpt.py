"""The adapter for the package's own `revkernels.GPT`: its residual body becomes a RetrofitStack.

A GPT with arch 'baseline' or 'checkpoint' has a `ResidualStack` body, p[j+1] = p[j] + f_j(p[j]) with
f_j a `TransformerBlock`; the student keeps everything else (embeddings, final norm, head) and runs the
same blocks as the updates of a `RetrofitStack` (core.py). Find it with `retrofit_stack(student)`.
"""
import copy

from torch import nn

from .core import RetrofitStack


def is_gpt(model: nn.Module) -> bool:
    from ..models import GPT
    return isinstance(model, GPT)


def retrofit_gpt(model: nn.Module, **stack_kwargs) -> nn.Module:
    """A deep copy of `model` whose body is RetrofitStack(body blocks, **stack_kwargs); cfg.arch =
    'retrofit' and `retrofit_source_arch` remembers the source's arch."""
    from ..models import ResidualStack
    arch = getattr(model.cfg, "arch", None)
    if not isinstance(model.body, ResidualStack):
        raise ValueError(f"cannot retrofit a revkernels GPT with arch={arch!r}: only the residual archs "
                         "'baseline' and 'checkpoint' are retrofitted (the others are reversible already)")
    student = copy.deepcopy(model)
    if stack_kwargs.get("form") == "linear":
        stack_kwargs = {**stack_kwargs, "width": model.cfg.d_model}
    student.body = RetrofitStack(list(student.body.blocks), **stack_kwargs)
    student.cfg = copy.copy(model.cfg)
    student.cfg.arch = "retrofit"          # GPTConfig validates arch only when constructed
    student.retrofit_source_arch = arch
    return student


def unretrofit_gpt(model: nn.Module) -> nn.Module:
    """An ordinary residual copy (the source arch) with the student's weights."""
    from ..models import ResidualStack
    plain = copy.deepcopy(model)
    arch = getattr(plain, "retrofit_source_arch", "baseline")
    plain.body = ResidualStack(list(plain.body.updates), use_checkpoint=arch == "checkpoint")
    plain.cfg = copy.copy(plain.cfg)
    plain.cfg.arch = arch
    del plain.retrofit_source_arch
    return plain
