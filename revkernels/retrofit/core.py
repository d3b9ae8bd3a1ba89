"""Retrofit a residual network into a reversible midpoint(a) network (paper section 4); model-agnostic.

A residual stack  p[j+1] = p[j] + f_j(p[j])  satisfies, for any a_j (use p[j] = p[j-1] + f_{j-1}(p[j-1])
to rewrite a_j * p[j]):

    p[j+1] = a_j p[j-1] + (1 - a_j) p[j] + f_j(p[j]) + a_j f_{j-1}(p[j-1])                (eq. 4.3)

Both forms run p[j+1] = a_j p[j-1] + (1 - a_j) p[j] + F_j(p[j]),  p[-1] = p[0] = x, a midpoint(a) step
with c = 1 under `ReversibleStack`'s reversible backward; they differ in F_j:

- form="compact":  F_j = f_j. One block call per layer (the teacher's compute). Its step differs from the
  residual step p[j] + f_j(p[j]) by a_j (p[j-1] - p[j]) (on the teacher's states: -a_j f_{j-1}(p[j-1])),
  so it converges to the residual teacher as a -> 0 (the logits' KL falls like a^2).
- form="linear":   F_j(p) = f_j(p) + a_j g_j(p), F_0 = f_0, with g_j(p) = W_j p + b_j a linear surrogate of the
  previous update f_{j-1}(p[j-1]) = p[j] - p[j-1] as a function of p[j], fitted to the teacher's states by
  ridge regression (correction.py). Then F_j(p[j]) - (f_j(p[j]) + a_j f_{j-1}(p[j-1])) = a_j (g_j(p[j]) -
  (p[j] - p[j-1])): its step is eq. 4.3's up to a_j times the fit's residual, one block call per layer plus
  a d x d matmul. g_j starts at 0 (the compact form) until fitted; W_j, b_j are trainable parameters.
- form="eq4.5":    F_j(p) = f_j(p) + a_j f_{j-1}(p_hat(p)), F_0 = f_0 (the paper's eq. 4.5), with p_hat
  the fixed-point estimate of p[j-1] = p[j] - f_{j-1}(p[j-1]) started at p_hat_0 = p (eq. 4.7):

      cand_{i+1} = p - f_{j-1}(p_hat_i);  r(q) = |p - f_{j-1}(q) - q| (per token, norm over d)

  where a token takes cand_{i+1} only while r(cand_{i+1}) <= r(p_hat_i), and is frozen at its last
  accepted estimate after the first rejection. So iterations never make the estimate worse (by its
  fixed-point residual). Layer j >= 1 calls f_{j-1} exactly iterations + 1 times whatever is accepted
  (torch.where, no host sync), so the number of block calls and their cache slots are fixed.

Block-call slots (the index of each block call within one forward; a KV cache keeps one entry per slot):
compact and linear: layer j -> slot j. eq4.5: f_j(p) inside F_j -> slot j; the i-th call of f_{j-1} inside F_j
(i = 0..iterations, j >= 1) -> slot L + (j-1)(iterations+1) + i.

This file imports nothing from the model adapters (gpt.py, hf.py) or the checkpoint I/O above them.
"""
import contextlib
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..fixed_point import dyadic_parts
from ..layers import ReversibleStack, per_layer_a

ACoef = Union[float, Sequence[float], torch.Tensor]
FORMS = ("compact", "eq4.5", "linear")
MAX_FLOAT_AMPLIFICATION = 1e3     # beyond it float mode's gradients are untrustworthy (layers.py warns there too)


def check_form(form, iterations):
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    if form != "eq4.5" and iterations != 0:
        raise ValueError(f"iterations={iterations} with form={form!r}: only eq4.5 has a fixed-point estimate "
                         "to iterate; pass iterations=0, or form='eq4.5'")


def block_calls(n_layers: int, iterations: int = 0, form: str = "compact") -> int:
    """Block calls (= cache slots) in one forward: compact and linear L; eq4.5 L + (L-1)(iterations+1)."""
    check_form(form, iterations)
    return n_layers if form != "eq4.5" else n_layers + (n_layers - 1) * (iterations + 1)


def block_call_slot(n_layers: int, iterations: int, form: str, layer: int, i: Optional[int] = None) -> int:
    """The slot of one block call: layer j's own f_j (i=None) -> j; in eq4.5 the i-th call of f_{j-1}
    inside F_j (j >= 1, i = 0..iterations, i = iterations the final evaluation) -> L + (j-1)(iterations+1) + i."""
    check_form(form, iterations)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range for {n_layers} layers")
    if i is None:
        return layer
    if form != "eq4.5" or layer == 0 or not 0 <= i <= iterations:
        raise ValueError(f"no call i={i} of f_(j-1) inside F_{layer} (form={form!r}, iterations={iterations})")
    return n_layers + (layer - 1) * (iterations + 1) + i


def cast_for(module: nn.Module, p: torch.Tensor) -> torch.Tensor:
    """p in the dtype of the module's floating-point parameters (unchanged under autocast or without
    such parameters): a bf16 student's blocks and corrections see a bf16 copy of the fp32 reversible state."""
    dtype = next((t.dtype for t in module.parameters() if t.is_floating_point()), p.dtype)
    return p if p.dtype == dtype or torch.is_autocast_enabled(p.device.type) else p.to(dtype)


def in_own_dtype(module: nn.Module, p: torch.Tensor) -> torch.Tensor:
    """module(p) run in the module's own dtype (cast_for), returned in p's."""
    return module(cast_for(module, p)).to(p.dtype)


def call_update(f, p, context, slot):
    """f(p, context, slot) for an update with `takes_context = True` (the adapters, which cast themselves),
    else f(p) in f's own dtype."""
    return f(p, context, slot) if getattr(f, "takes_context", False) else in_own_dtype(f, p)


def token_residual(p, q, fq):
    """r(q) = |p - f(q) - q| per token (norm over the last dim): how far q is from the fixed point of
    q = p - f(q), i.e. from being p[j-1]."""
    diff = p - fq - q
    return torch.linalg.vector_norm(diff, dim=-1, dtype=torch.promote_types(diff.dtype, torch.float32))


class RetrofitBlock(nn.Module):
    """F_j of one forward call. Compact (f_prev and correction None): F_j(p) = f_j(p). Linear (correction
    g_j): F_j(p) = f_j(p) + a_j g_j(p). Eq. 4.5: F_j(p) = f_j(p) + a_j f_{j-1}(p_hat(p)) with the guarded
    fixed-point estimate of the module docstring.

    f, f_prev: residual updates; context / context_prev: their per-call contexts; slot / prev_slots:
    their block-call slots (prev_slots: iterations + 1 of them). residuals: a dict whose entry [slot]
    receives the accepted estimate's per-token residual after each of the iterations + 1 calls,
    (iterations + 1, ...) detached (`RetrofitStack.last_fixed_point_residuals`; a recompute overwrites it).
    """

    def __init__(self, f: nn.Module, f_prev: Optional[nn.Module] = None, a: Union[float, torch.Tensor] = 1.0,
                 iterations: int = 0, context=None, *, context_prev=None, slot: int = 0,
                 prev_slots: Sequence[int] = (), residuals: Optional[dict] = None,
                 correction: Optional[nn.Module] = None):
        super().__init__()
        if f_prev is not None and correction is not None:
            raise ValueError("a block has either eq4.5's f_prev or the linear form's correction, not both")
        if f_prev is not None and len(prev_slots) != iterations + 1:
            raise ValueError(f"prev_slots needs iterations + 1 = {iterations + 1} slots, got {len(prev_slots)}")
        self.f, self.f_prev = f, f_prev
        self.a, self.iterations = a, iterations
        self.context, self.context_prev = context, context_prev
        self.slot, self.prev_slots, self.residuals = slot, list(prev_slots), residuals
        self.correction = correction

    def forward(self, p):
        out = call_update(self.f, p, self.context, self.slot)
        if self.correction is not None:
            return out + self.a * in_own_dtype(self.correction, p)
        if self.f_prev is None:
            return out
        return out + self.a * self.estimate_update(p)

    def estimate_update(self, p):
        """f_{j-1}(p_hat) for the guarded estimate p_hat of p[j-1] (module docstring)."""
        def g(q, i):
            return call_update(self.f_prev, q, self.context_prev, self.prev_slots[i])
        q = p
        fq = g(q, 0)
        r = token_residual(p, q, fq)
        history = [r.detach()]
        active = torch.ones_like(r, dtype=torch.bool)
        for i in range(1, self.iterations + 1):
            cand = p - fq
            f_cand = g(cand, i)
            r_cand = token_residual(p, cand, f_cand)
            active = active & (r_cand <= r)       # the first rejection freezes the token for good
            take = active.unsqueeze(-1)
            q, fq, r = torch.where(take, cand, q), torch.where(take, f_cand, fq), torch.where(active, r_cand, r)
            history.append(r.detach())
        if self.residuals is not None:
            self.residuals[self.slot] = torch.stack(history)
        return fq

    def extra_repr(self):
        return (f"iterations={self.iterations}, first={self.f_prev is None}, slot={self.slot}, "
                f"correction={self.correction is not None}")


def _amplification(a):
    """prod_j max(1, 1/min_c |a_j|): how much float mode's reversible backward can amplify rounding."""
    n = a.shape[0]
    min_abs = a.detach().abs().reshape(n, -1).amin(dim=1).double().cpu()
    return float(torch.prod(torch.clamp(1 / min_abs, min=1.0)))


def check_coefficients(a: torch.Tensor, exact: bool):
    """Exact: every a_j dyadic (ValueError naming the nearest allowed value). Float: refuse when
    prod_j max(1, 1/|a_j|) > 1e3, where the reversible backward's gradients are no longer trustworthy."""
    if exact:
        for j in range(a.shape[0]):
            dyadic_parts(a[j], f"a[{j}]")
        return
    amp = _amplification(a)
    if amp > MAX_FLOAT_AMPLIFICATION:
        raise ValueError(
            f"exact=False with these a amplifies rounding by {amp:.3g} over {a.shape[0]} layers (product of "
            f"max(1, 1/|a_j|) > {MAX_FLOAT_AMPLIFICATION:g}): the reversible backward's gradients would be wrong "
            "(measured 15.6-34.7 relative error at a=0.5 on 30 layers). Use exact=True (bit-exact "
            "reconstruction, a dyadic), or |a_j| closer to 1")


class RetrofitStack(nn.Module):
    """The retrofitted stack over `updates` (the residual updates f_j, modules mapping (B, T, d) to
    (B, T, d), as in p + f_j(p)); forward(x, context=None) returns p[L] of the chosen form.

    a: a float, per-layer values (L,) or (L, d); 0 refused. iterations: eq4.5's fixed-point steps (0 for
    compact). exact: bit-exact reversible backward on the fixed-point grid (a must be dyadic; a = m/2^k
    costs k side bits per element per layer); exact=False is refused where its backward cannot be
    trusted (`check_coefficients`). One `ReversibleStack` (`self.reversible_stack`, not a submodule, so
    state_dict names are the updates') runs every forward with per-call blocks; its meter is read through
    `last_reconstruction_error`, `last_side_info_bytes`, `max_reconstruction_error`.

    forward's context: None, one object for every layer, or a list of L per-layer contexts; an update
    with `takes_context = True` is called as f(p, context_j, slot) (slots: `block_call_slot`), others as
    f(p). Every forward makes every block call.
    `reversible = False` runs the same forward with ordinary autograd (the reference).

    form="linear" needs `width` (d): `corrections[j - 1]` is g_j, an nn.Linear(d, d) initialised to 0 (so
    the stack starts as the compact form) on the updates' device and dtype; correction.fit_correction
    fits them.
    """

    def __init__(self, updates: Sequence[nn.Module], a: ACoef = 2 ** -4, iterations: int = 0, *,
                 form: str = "compact", state_dtype: torch.dtype = torch.float32,
                 preserve_rng_state: Union[bool, str] = "auto", exact: bool = True,
                 max_reconstruction_error: Optional[float] = None, width: Optional[int] = None):
        super().__init__()
        if len(updates) == 0:
            raise ValueError("updates is empty: nothing to retrofit")
        check_form(form, iterations)
        coef = per_layer_a(a, len(updates))
        check_coefficients(coef, exact)
        self.updates = nn.ModuleList(updates)
        param = next((t for u in updates for t in u.parameters()), None)
        device = torch.device("cpu") if param is None else param.device
        self.width = None
        if form == "linear":
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"form='linear' needs width=d (the state's last dimension), got {width!r}")
            dtype = torch.float32 if param is None else param.dtype
            self.width = width
            self.corrections = nn.ModuleList(nn.Linear(width, width, device=device, dtype=dtype)
                                             for _ in range(len(updates) - 1))
            for g in self.corrections:
                nn.init.zeros_(g.weight)
                nn.init.zeros_(g.bias)
        # a is configuration (recorded in config.json by save_pretrained), not a weight: not in the state_dict
        self.register_buffer("a", coef.to(device), persistent=False)
        self.form, self.iterations = form, iterations
        object.__setattr__(self, "reversible_stack", ReversibleStack(
            list(self.updates), scheme="midpoint_a", h=1.0, a=coef, state_dtype=state_dtype,
            preserve_rng_state=preserve_rng_state, max_reconstruction_error=max_reconstruction_error,
            exact=exact))
        self.last_fixed_point_residuals = {}
        self._teacher_states = None

    # -------------------------------------------------- options, forwarded to the one ReversibleStack

    def _option(name, doc):
        def get(self):
            return getattr(self.reversible_stack, name)

        def put(self, value):
            setattr(self.reversible_stack, name, value)
        return property(get, put, doc=doc)

    reversible = _option("reversible", "True: the memory-free reversible backward; False: ordinary autograd.")
    state_dtype = _option("state_dtype", "dtype of the reversible state.")
    preserve_rng_state = _option("preserve_rng_state", "replay each block's RNG in the recompute (True/False/'auto').")
    del _option

    @property
    def exact(self) -> bool:
        return self.reversible_stack.exact

    @exact.setter
    def exact(self, value: bool):
        check_coefficients(self.a, bool(value))
        self.reversible_stack.exact = bool(value)

    @property
    def max_reconstruction_error(self):
        return self.reversible_stack.max_reconstruction_error

    @max_reconstruction_error.setter
    def max_reconstruction_error(self, value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"max_reconstruction_error must be None or a float >= 0, got {value!r}")
        self.reversible_stack.max_reconstruction_error = value

    @property
    def last_reconstruction_error(self) -> Optional[float]:
        """max|rebuilt x - x| / max|x| of the last reversible backward (None before one)."""
        return self.reversible_stack.last_reconstruction_error

    @property
    def last_side_info_bytes(self) -> Optional[int]:
        """Bytes of side information the last forward stored (exact mode; None before a forward;
        0 in float mode, which stores none)."""
        if not self.exact:
            return 0
        return getattr(self.reversible_stack, "last_side_info_bytes", None)

    def set_a(self, a: ACoef):
        """Replace the per-layer a (validated like the constructor's: 0 refused, dyadic when exact),
        on the stack's device; exact mode's cached dyadic split is rebuilt at the next forward."""
        coef = per_layer_a(a, len(self.updates))
        check_coefficients(coef, self.exact)
        self.a = coef.to(self.a.device)

    def mean_side_bits(self) -> float:
        """Mean over layers of k_j (a_j = m/2^k_j; 0 for a = +-1): side bits per element per layer of
        exact mode; 0.0 in float mode (no side information)."""
        if not self.exact:
            return 0.0
        ks = [dyadic_parts(self.a[j], f"a[{j}]")[1] for j in range(self.a.shape[0])]
        return sum(ks) / len(ks)

    def config_record(self) -> dict:
        """The configuration as JSON-able values (what save_pretrained records)."""
        record = {"a": self.a.tolist(), "iterations": self.iterations, "form": self.form, "exact": self.exact,
                  "state_dtype": str(self.state_dtype).split(".")[-1]}
        if self.form == "linear":
            record["width"] = self.width
        return record

    @staticmethod
    def kwargs_from_record(record: dict) -> dict:
        """Constructor keyword arguments from `config_record()`'s dict. Records written before forms
        existed (no "form"/"exact") were eq. 4.5 in float mode."""
        kwargs = {"a": record["a"], "iterations": int(record["iterations"]), "form": record.get("form", "eq4.5"),
                  "exact": bool(record.get("exact", False)), "state_dtype": getattr(torch, record["state_dtype"])}
        if kwargs["form"] == "linear":
            kwargs["width"] = int(record["width"])
        return kwargs

    # -------------------------------------------------- forward

    def _contexts(self, context):
        n = len(self.updates)
        if isinstance(context, list):
            if len(context) != n:
                raise ValueError(f"context is a list of {len(context)} but the stack has {n} layers: pass one "
                                 "context for every layer, or a list of one per layer")
            return context
        return [context] * n

    def blocks(self, context=None):
        """The F_j of this form bound to `context`, with their slots (a list of RetrofitBlocks sharing
        the updates); resets `last_fixed_point_residuals` ({layer j >= 1: (iterations + 1, ...) residuals of
        the accepted estimate after each call of f_(j-1)}), which the eq4.5 blocks fill."""
        ctx, n, it = self._contexts(context), len(self.updates), self.iterations
        self.last_fixed_point_residuals = residuals = {}
        if self.form == "compact":
            return [RetrofitBlock(f, context=ctx[j], slot=j) for j, f in enumerate(self.updates)]
        a = self.a
        if self.form == "linear":
            return [RetrofitBlock(f, a=a[j], context=ctx[j], slot=j, correction=self.corrections[j - 1] if j else None)
                    for j, f in enumerate(self.updates)]
        return [RetrofitBlock(f, self.updates[j - 1] if j else None, a[j], it, ctx[j],
                              context_prev=ctx[j - 1] if j else None, slot=j,
                              prev_slots=[block_call_slot(n, it, "eq4.5", j, i) for i in range(it + 1)] if j else (),
                              residuals=residuals)
                for j, f in enumerate(self.updates)]

    @contextlib.contextmanager
    def teacher_states(self):
        """Within the block, every forward runs the residual teacher p[j+1] = p[j] + f_j(p[j]) (each form's
        a -> 0 limit, ordinary autograd) and appends its states [p[0], ..., p[L-1]] (the inputs of
        f_0..f_{L-1}, detached) to the list this yields: what correction.fit_correction regresses on."""
        if self._teacher_states is not None:
            raise RuntimeError("teacher_states() is already active on this stack")
        self._teacher_states = recorded = []
        try:
            yield recorded
        finally:
            self._teacher_states = None

    def _teacher_forward(self, x, context):
        states, p, ctx = [], x, self._contexts(context)
        for j, f in enumerate(self.updates):
            states.append(p.detach())
            p = p + call_update(f, p, ctx[j], j)
        self._teacher_states.append(states)
        return p

    def forward(self, x, context=None):
        if self.a.device != x.device:
            raise ValueError(f"x is on {x.device} but the stack is on {self.a.device}")
        if self._teacher_states is not None:
            return self._teacher_forward(x, context)
        stack = self.reversible_stack
        stack.a = self.a                          # the same tensor: exact mode's cached split stays valid
        if stack.c.device != x.device:
            stack.c = stack.c.to(x.device)
        return stack.run_blocks(x, self.blocks(context))

    def extra_repr(self):
        return (f"n_layers={len(self.updates)}, form={self.form!r}, iterations={self.iterations}, "
                f"exact={self.exact}, reversible={self.reversible}")


# ------------------------------------------------------------------ finding the stack in a model

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
