"""Retrofit a residual network into a reversible midpoint(a) network (paper section 4).

A residual stack  p[j+1] = p[j] + f_j(p[j])  satisfies, for any a_j (use p[j] = p[j-1] + f_{j-1}(p[j-1])
to rewrite a_j * p[j]):

    p[j+1] = a_j p[j-1] + (1 - a_j) p[j] + f_j(p[j]) + a_j f_{j-1}(p[j-1])                (eq. 4.3)

Not reversible: the last term needs p[j-1]. Replace its argument by an estimate from p[j] alone, the
fixed-point iteration of p[j-1] = p[j] - f_{j-1}(p[j-1]) started at p[j]:

    p_hat_0 = p,   p_hat_{i+1} = p - f_{j-1}(p_hat_i),   i < iterations                    (eq. 4.7)

(iterations = 1 is eq. 4.4, iterations = 0 uses p_hat = p). Then

    F_j(p) = f_j(p) + a_j f_{j-1}(p_hat(p)),   F_0 = f_0
    p[j+1] = a_j p[j-1] + (1 - a_j) p[j] + F_j(p[j]),   p[-1] = p[0] = x                  (eq. 4.5)

is a midpoint(a) step with c = 1, run by `ReversibleStack` with the reversible backward. With the exact
p[j-1] the student reproduces the residual model for any a. For a linear update f(p) = W p the
estimate's error is p_hat - p[j-1] = -(-W)^(iterations+1) p[j-1], so the step's error is
O(|a| |W|^(iterations+2)): it vanishes as the updates shrink and as `iterations` grows while |W| < 1.

Cost: layer j >= 1 calls f_j once and f_{j-1} (iterations + 1) times, 1 + (iterations + 1) block
evaluations per layer in the forward (layer 0: one), the same again in the backward's recompute.
"""
import copy
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..fixed_point import dyadic_parts
from ..layers import ReversibleStack, per_layer_a

ACoef = Union[float, Sequence[float], torch.Tensor]


def block_calls(n_layers: int, iterations: int) -> int:
    """Block evaluations in one forward of a retrofitted stack: L + (L-1)(iterations+1)."""
    return n_layers + (n_layers - 1) * (iterations + 1)


class RetrofitBlock(nn.Module):
    """F_j(p) = f_j(p) + a_j f_{j-1}(p_hat(p)), with p_hat from `iterations` fixed-point steps
    p_hat <- p - f_{j-1}(p_hat) started at p; F_0 = f_0 when f_prev is None.

    f, f_prev: residual updates (modules mapping p -> f(p)); modules with `takes_context = True` are
    called as f(p, context) (the Hugging Face adapters: attention mask, rotary embeddings, ...).
    a: a_j, a float, a 0-d tensor or a per-channel tensor of size d.
    """

    def __init__(self, f: nn.Module, f_prev: Optional[nn.Module] = None, a: Union[float, torch.Tensor] = 0.5,
                 iterations: int = 1, context=None):
        super().__init__()
        _check_iterations(iterations)
        self.f, self.f_prev = f, f_prev
        self.a, self.iterations, self.context = a, iterations, context

    def _call(self, f, p):
        return f(p, self.context) if getattr(f, "takes_context", False) else f(p)

    def forward(self, p):
        out = self._call(self.f, p)
        if self.f_prev is None:
            return out
        p_hat = p
        for _ in range(self.iterations):
            p_hat = p - self._call(self.f_prev, p_hat)
        return out + self.a * self._call(self.f_prev, p_hat)

    def extra_repr(self):
        return f"iterations={self.iterations}, first={self.f_prev is None}"


def _check_iterations(iterations):
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")


class RetrofitStack(nn.Module):
    """The retrofitted stack: `updates` are the residual updates f_j (modules mapping (B, T, d) to
    (B, T, d), as in a residual stack p + f_j(p)); forward(x, context=None) returns p[L] of eq. 4.5.

    Each call builds the RetrofitBlocks F_j bound to that call's `context` and runs them through a
    `ReversibleStack(scheme='midpoint_a', h=1, a=a)`, so the context (masks, rotary tables) lives exactly
    as long as that call's autograd graph, which the backward's recompute needs.
    `reversible = False` runs the same forward with ordinary autograd (the reference). `exact = True` runs
    it bit-exactly on the fixed-point grid (a dyadic: a = 0.5 costs one side bit per element per layer).
    """

    def __init__(self, updates: Sequence[nn.Module], a: ACoef = 0.5, iterations: int = 1, *,
                 state_dtype: torch.dtype = torch.float32, preserve_rng_state: Union[bool, str] = "auto",
                 exact: bool = False):
        super().__init__()
        if len(updates) == 0:
            raise ValueError("updates is empty: nothing to retrofit")
        _check_iterations(iterations)
        self.updates = nn.ModuleList(updates)
        device = next((t.device for u in updates for t in u.parameters()), torch.device("cpu"))
        # a is configuration (recorded in config.json by save_pretrained), not a weight: not in the state_dict
        self.register_buffer("a", per_layer_a(a, len(updates)).to(device), persistent=False)
        self.iterations = iterations
        self.state_dtype = state_dtype
        self.preserve_rng_state = preserve_rng_state
        self.reversible = True
        self.exact = exact

    def blocks(self, context=None):
        """The F_j of eq. 4.5 bound to `context` (a list of RetrofitBlocks sharing the updates)."""
        a = self.a.float()
        return [RetrofitBlock(f, self.updates[j - 1] if j else None, a[j], self.iterations, context)
                for j, f in enumerate(self.updates)]

    def forward(self, x, context=None):
        if self.a.device != x.device:
            raise ValueError(f"x is on {x.device} but the stack is on {self.a.device}")
        stack = ReversibleStack(self.blocks(context), scheme="midpoint_a", h=1.0, a=self.a.float(),
                                state_dtype=self.state_dtype, preserve_rng_state=self.preserve_rng_state,
                                exact=self.exact)
        for name, buf in list(stack.named_buffers(recurse=False)):   # c is built on the CPU
            setattr(stack, name, buf.to(x.device))
        stack.reversible = self.reversible
        return stack(x)

    def extra_repr(self):
        return f"n_layers={len(self.updates)}, iterations={self.iterations}, reversible={self.reversible}"


# ------------------------------------------------------------------ the package's own GPT

def _retrofit_gpt(model, a, iterations, state_dtype):
    from ..models import ResidualStack
    arch = getattr(model.cfg, "arch", None)
    if not isinstance(model.body, ResidualStack):
        raise ValueError(f"cannot retrofit a revkernels GPT with arch={arch!r}: only the residual archs "
                         "'baseline' and 'checkpoint' are retrofitted (the others are reversible already)")
    student = copy.deepcopy(model)
    student.body = RetrofitStack(list(student.body.blocks), a, iterations, state_dtype=state_dtype)
    student.cfg = copy.copy(model.cfg)
    student.cfg.arch = "retrofit"          # GPTConfig validates arch only when constructed
    student.retrofit_source_arch = arch
    return student


def _unretrofit_gpt(model):
    from ..models import ResidualStack
    plain = copy.deepcopy(model)
    arch = getattr(plain, "retrofit_source_arch", "baseline")
    plain.body = ResidualStack(list(plain.body.updates), use_checkpoint=arch == "checkpoint")
    plain.cfg = copy.copy(plain.cfg)
    plain.cfg.arch = arch
    del plain.retrofit_source_arch
    return plain


def _is_own_gpt(model):
    from ..models import GPT
    return isinstance(model, GPT)


# ------------------------------------------------------------------ public entry points

def retrofit(model: nn.Module, a: ACoef = 0.5, iterations: int = 1, *,
             state_dtype: torch.dtype = torch.float32, exact: bool = False) -> nn.Module:
    """A reversible copy of the residual `model` (paper section 4), same call signature and outputs.

    Supported: transformers `GPT2LMHeadModel`, `GPT2Model`, `LlamaForCausalLM`, `LlamaModel`, and
    revkernels `GPT` with arch 'baseline' or 'checkpoint'. The blocks' weights are deep-copied (the
    original model is untouched and can serve as the frozen teacher), never re-initialised.

    a: a float, or per-layer values (L,) or (L, d); 0 is refused. iterations >= 0: fixed-point steps
    for p[j-1] (eq. 4.7). The body runs as a `RetrofitStack` (find it with `retrofit_stack(model)`; its
    `reversible` switch selects the memory-free backward, the default, or ordinary autograd).

    Hugging Face models: the KV cache is not supported (config.use_cache is set to False; a call
    passing past_key_values is refused) and per-layer `output_hidden_states` / `output_attentions`
    are not those of the residual model. `student.save_pretrained(d)` writes the source model's
    checkpoint with the student's weights plus a `revkernels_retrofit` field in config.json, which
    `revkernels.retrofit.from_pretrained(d)` turns back into this student (see hf_checkpoint.py);
    `gradient_checkpointing_enable()` is a no-op with a warning. `unretrofit(student)` gives back an
    ordinary residual model with the student's weights.
    exact: run the body in exact mode (bit-exact reconstruction; a must be dyadic, ValueError naming
    the nearest allowed value otherwise).
    """
    _check_iterations(iterations)
    if exact:
        dyadic_parts(torch.as_tensor(a, dtype=torch.float32))
    if not isinstance(model, nn.Module):
        raise TypeError(f"retrofit expects an nn.Module, got {type(model).__name__}")
    if find_retrofit_stack(model) is not None:
        raise ValueError(f"{type(model).__name__} is already retrofitted")
    if _is_own_gpt(model):
        student = _retrofit_gpt(model, a, iterations, state_dtype)
    else:
        from . import hf
        if not hf.is_transformers_model(model):
            raise TypeError(f"retrofit does not support {type(model).__module__}.{type(model).__name__}: "
                            f"supported are {', '.join(SUPPORTED)}")
        student = hf.retrofit_hf(model, a, iterations, state_dtype)
    retrofit_stack(student).exact = exact
    return student


SUPPORTED = ("transformers GPT2LMHeadModel", "GPT2Model", "LlamaForCausalLM", "LlamaModel",
             "revkernels GPT (arch 'baseline' or 'checkpoint')")


def find_retrofit_stack(model: nn.Module) -> Optional[RetrofitStack]:
    """The RetrofitStack inside `model`, or None."""
    for m in model.modules():
        if isinstance(m, RetrofitStack):
            return m
    return None


def retrofit_stack(model: nn.Module) -> RetrofitStack:
    """The RetrofitStack of a retrofitted model (ValueError if there is none)."""
    stack = find_retrofit_stack(model)
    if stack is None:
        raise ValueError(f"{type(model).__name__} is not a retrofitted model")
    return stack


def unretrofit(model: nn.Module) -> nn.Module:
    """An ordinary residual copy of a retrofitted model, with its current weights."""
    retrofit_stack(model)
    if _is_own_gpt(model):
        return _unretrofit_gpt(model)
    from . import hf
    return hf.unretrofit_hf(model)
