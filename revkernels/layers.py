"""Drop-in reversible layers and the transformer blocks they wrap.

    ReversibleStack:   p[j+1] = a_j*p[j-1] + (1-a_j)*p[j] + c_j*f_j(p[j]),  p[-1] = p[0] = x  (eq. 3.6)
    HamiltonianStack:  q[l] = a*q[l-1] + Attn_l(p[l-1]);  p[l] = b*p[l-1] + MLP_l(q[l])   (eqs. 2.8-2.9)

Both return the last state and have a ``reversible`` switch: True runs the memory-free backward of
``revkernels.scheduler``; False runs the same forward with ordinary autograd (the reference).
Memory for speed: ``stored_layers`` keeps the autograd graph of some layers (no recompute for them),
``store_policy='matmuls'`` keeps the matmul and attention outputs of the recomputed ones.
"""
import math
import numbers
import warnings
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import reference as ref
from .attention import causal_attention
from .exact_scheduler import ExactCoefs, check_unit_coefficient, exact_hamiltonian, exact_three_term
from .fixed_point import round_to_dyadic
from .kv_cache import active_cache
from .scheduler import HamiltonianFunction, StackRun, ThreeTermFunction, checked_update
from .store import check_store_policy

SCHEMES = ("midpoint", "leapfrog", "midpoint_a")


def draw_midpoint_a(n_layers, generator=None):
    """a_j from eq. 3.7: with prob. 1/2 a = 1 + U(-1,1)/2, else a = -1 + U(-1,1)/2 (never 0)."""
    u = torch.rand(n_layers, generator=generator, dtype=torch.float64) * 2 - 1
    sign = torch.where(torch.rand(n_layers, generator=generator, dtype=torch.float64) < 0.5, 1.0, -1.0)
    return (sign + u / 2).float()


def per_layer_a(a, n):
    """a as a float32 tensor of n per-layer values, shape (n,) or (n, d); refuses 0 and non-finite values."""
    if isinstance(a, bool):
        raise TypeError("a must be a float, a sequence of per-layer values or a tensor, got a bool")
    if isinstance(a, (int, float)):
        t = torch.full((n,), float(a))
    else:
        t = torch.as_tensor(a).detach().to(torch.float32).clone()
        if t.dim() == 0:
            t = t.expand(n).clone()
        if t.dim() > 2 or t.shape[0] != n:
            raise ValueError(f"a has shape {tuple(t.shape)}: expected a float or {n} per-layer values "
                             f"(shape ({n},), or ({n}, d) per channel)")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("a must be finite")
    if bool((t == 0).any()):
        raise ValueError("a contains 0: a layer with a_j = 0 is not invertible")
    return t


def _refuse_stateful(blocks):
    for block in blocks:
        for m in block.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                raise ValueError(f"blocks contain {type(m).__name__} with running statistics: the backward "
                                 "recompute would update them twice. Use LayerNorm or track_running_stats=False")


def stored_indices(stored_layers, n_layers):
    """`stored_layers` as a sorted tuple of layer indices. An int k stores the last k layers: the
    backward reaches them first, so their graphs are freed before any recompute runs, and its peak holds
    the stored graphs or one recomputed block's graph, not both (the stored f_j, one state per stored
    layer, stay until the stack's backward ends). A sequence of ints names the layers."""
    if isinstance(stored_layers, bool):
        raise TypeError("stored_layers must be an int or a sequence of layer indices, got a bool")
    if isinstance(stored_layers, numbers.Integral):
        stored_layers = int(stored_layers)
        if not 0 <= stored_layers <= n_layers:
            raise ValueError(f"stored_layers={stored_layers} must be between 0 and the number of layers ({n_layers})")
        return tuple(range(n_layers - stored_layers, n_layers))
    if isinstance(stored_layers, torch.Tensor) or not isinstance(stored_layers, Sequence):
        raise TypeError(f"stored_layers must be an int or a sequence of layer indices, got "
                        f"{type(stored_layers).__name__}")
    for i in stored_layers:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"stored_layers holds {i!r}: layer indices must be ints")
        if not 0 <= i < n_layers:
            raise ValueError(f"stored_layers holds {i}: layer indices must be in [0, {n_layers})")
    indices = [int(i) for i in stored_layers]
    if len(set(indices)) != len(indices):
        raise ValueError(f"stored_layers {indices} names a layer twice")
    return tuple(sorted(indices))


def _needs_backward(inputs, blocks):
    """Whether autograd will record a call on `inputs` (none given: whenever grad is enabled); only
    then is keeping graphs or op outputs worth it."""
    return torch.is_grad_enabled() and (len(inputs) == 0 or any(x.requires_grad for x in inputs) or
                                        any(p.requires_grad for b in blocks for p in b.parameters()))


def _uses_dropout(blocks):
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training
               for b in blocks for m in b.modules())


class _StackBase(nn.Module):
    """Shared options: state dtype, RNG replay, the reversible switch, shape checks, and what the
    reversible forward keeps for speed (`stored_layers`, `store_policy`; both settable later).

    stored_layers: an int k (the last k layers) or layer indices; those layers keep their autograd
    graph in the forward (a copy of their input and their output f_j), so the backward runs their vjp
    without a recompute and their inverse step uses the stored f_j. 0: every layer is recomputed.
    store_policy: None, or 'matmuls': recomputed layers keep the outputs of their matmuls and attention
    (revkernels.store) and the recompute returns them; `last_policy_bytes` is what it kept in the last
    forward (saved-tensor hooks do not see it; stored layers' graphs they do).
    Neither changes the forward's values, nor the `reversible=False` reference."""

    def __init__(self, blocks, state_dtype, preserve_rng_state, max_reconstruction_error=None, *,
                 n_layers, stored_layers=0, store_policy=None):
        super().__init__()
        if max_reconstruction_error is not None and not (
                isinstance(max_reconstruction_error, (int, float)) and not isinstance(max_reconstruction_error, bool)
                and max_reconstruction_error >= 0):
            raise ValueError(f"max_reconstruction_error must be None or a float >= 0, got {max_reconstruction_error!r}")
        if len(blocks) == 0:
            raise ValueError("blocks is empty: a stack needs at least one block")
        if not all(isinstance(b, nn.Module) for b in blocks):
            raise TypeError("blocks must be nn.Modules")
        if not state_dtype.is_floating_point:
            raise TypeError(f"state_dtype must be floating point, got {state_dtype}")
        if preserve_rng_state not in (True, False, "auto"):
            raise ValueError("preserve_rng_state must be True, False or 'auto'")
        _refuse_stateful(blocks)
        self.state_dtype = state_dtype
        self.preserve_rng_state = preserve_rng_state
        self.max_reconstruction_error = max_reconstruction_error
        self.reversible = True
        self._reconstruction_error = None
        self._n_layers = n_layers
        self.stored_layers = stored_layers
        self.store_policy = store_policy
        self.last_policy_bytes = 0

    @property
    def stored_layers(self):
        """The indices of the layers whose graph the reversible forward keeps (a sorted tuple)."""
        return self._stored_layers

    @stored_layers.setter
    def stored_layers(self, value):
        self._stored_layers = stored_indices(value, self._n_layers)

    @property
    def store_policy(self):
        return self._store_policy

    @store_policy.setter
    def store_policy(self, value):
        self._store_policy = check_store_policy(value)

    def _stored_blocks(self):
        """Block indices (in the blocks the scheduler runs) of the stored layers."""
        return frozenset(self.stored_layers)

    @property
    def last_reconstruction_error(self):
        """After each reversible backward: max over the rebuilt initial state(s) of
        max|rebuilt - original| / max|original| (a float; None before the first backward). Reading it
        synchronises with the device once; the backward itself does not."""
        err = self._reconstruction_error
        return None if err is None else float(err)

    def _record_reconstruction(self, err):
        self._reconstruction_error = err
        limit = self.max_reconstruction_error
        if limit is not None and float(err) > limit:
            raise RuntimeError(
                f"reversible backward rebuilt the input with relative error {float(err):.3g} > "
                f"max_reconstruction_error={limit:g}: the gradients of this step are not trustworthy. "
                "Use exact=True (bit-exact reconstruction), fp32 blocks, smaller steps h, or |a| >= 1")

    def _warn_if_runaway(self, amplification):
        """Drift grows like the product over layers of max(1, 1/|a_j|): warn beyond 1e3."""
        if amplification > 1e3:
            warnings.warn(
                f"the coefficients amplify reconstruction errors by up to {amplification:.3g} over the depth "
                "(product of max(1, 1/|a_j|)): the reversible backward's gradients may drift far from "
                "autograd's. Use exact=True for bit-exact reconstruction, or |a_j| >= 1",
                stacklevel=3)

    def _run(self, blocks, *inputs):
        """The StackRun of a reversible call on `inputs`: the stored layers and the store policy apply
        when autograd records the call."""
        preserve = self.preserve_rng_state
        if preserve == "auto":
            preserve = _uses_dropout(blocks)
        keep = (len(self.stored_layers) > 0 or self.store_policy is not None) and _needs_backward(inputs, blocks)
        if keep and torch.compiler.is_compiling():
            raise NotImplementedError(
                "stored_layers / store_policy under a whole-model torch.compile: compile the blocks instead "
                "(torch.compile(block)), or set stored_layers=0 and store_policy=None")
        return StackRun(blocks, self.state_dtype, preserve, self._record_reconstruction,
                        stored=self._stored_blocks() if keep else frozenset(),
                        store_policy=self.store_policy if keep else None)

    def _ran(self, run):
        self.last_policy_bytes = run.policy_bytes

    def _memory_repr(self):
        out = f", stored_layers={list(self.stored_layers)}" if self.stored_layers else ""
        return out + (f", store_policy={self.store_policy!r}" if self.store_policy else "")

    @staticmethod
    def _check_input(x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point tensor of shape (..., d)")



class ReversibleStack(_StackBase):
    """Reversible three-term stack over `blocks` (each maps (B, T, d) -> (B, T, d), the update f_j).

    scheme: 'midpoint' (a=1, c=2h), 'leapfrog' (a=-1, c=h^2), 'midpoint_a' (c=h; `a` a float, a
    sequence or tensor of per-layer values, or None to draw eq. 3.7 from `generator`).
    learnable_a: make `a` a Parameter whose gradient comes from the fused reduction.
    preserve_rng_state: replay each block's RNG in the recompute; 'auto' = when dropout is active.
    max_reconstruction_error: raise in the backward when `last_reconstruction_error` (the rebuilt
    input's relative error, measured on every reversible backward) exceeds it.
    exact: bit-exact reversibility on the int64 fixed-point grid (revkernels.exact_scheduler); a must be
    dyadic (m/2^k, k <= 8; eq. 3.7 draws are rounded to multiples of 1/4), not learnable.
    stored_layers, store_policy: memory for speed (see _StackBase); exact mode supports both.
    """

    def __init__(self, blocks: Sequence[nn.Module], scheme: str = "midpoint", h: float = 1.0,
                 a: Union[None, float, Sequence[float], torch.Tensor] = None, *, learnable_a: bool = False,
                 generator: torch.Generator = None, state_dtype: torch.dtype = torch.float32,
                 preserve_rng_state: Union[bool, str] = "auto", max_reconstruction_error: float = None,
                 exact: bool = False, stored_layers: Union[int, Sequence[int]] = 0, store_policy: str = None):
        super().__init__(blocks, state_dtype, preserve_rng_state, max_reconstruction_error,
                         n_layers=len(blocks), stored_layers=stored_layers, store_policy=store_policy)
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not math.isfinite(h):
            raise TypeError(f"h must be a finite float, got {h!r}")
        n = len(blocks)
        self.blocks = nn.ModuleList(blocks)
        self.scheme, self.h = scheme, float(h)
        if scheme != "midpoint_a" and a is not None:
            raise ValueError(f"a is fixed by scheme {scheme!r}; pass it only with scheme='midpoint_a'")
        coef_a = {"midpoint": torch.ones(n), "leapfrog": -torch.ones(n)}.get(scheme)
        if coef_a is None:
            coef_a = draw_midpoint_a(n, generator) if a is None else per_layer_a(a, n)
        c = {"midpoint": 2 * self.h, "leapfrog": self.h ** 2, "midpoint_a": self.h}[scheme]
        self.exact = bool(exact)
        if exact:
            if learnable_a:
                raise ValueError("learnable_a is not supported with exact=True: a must stay dyadic")
            if scheme == "midpoint_a" and a is None:
                coef_a = round_to_dyadic(coef_a)
            ExactCoefs.of(coef_a, torch.full((n,), c), "cpu")     # ValueError naming the nearest allowed a
        else:       # exact mode rebuilds bit for bit: no drift to warn about
            min_abs_a = coef_a.abs().reshape(n, -1).amin(dim=1).double()
            self._warn_if_runaway(float(torch.prod(torch.clamp(1 / min_abs_a, min=1.0))))
        if learnable_a:
            self.a = nn.Parameter(coef_a)
        else:
            self.register_buffer("a", coef_a)
        self.register_buffer("c", torch.full((n,), c))

    def forward(self, x):
        return self.run_blocks(x, list(self.blocks))

    def run_blocks(self, x, blocks):
        """p[L] of this stack's scheme, coefficients, options and meter over `blocks` instead of
        self.blocks (same length; e.g. the retrofit's per-call blocks bound to masks and rotary
        tables, which must live as long as this call's autograd graph)."""
        if len(blocks) != len(self.blocks):
            raise ValueError(f"run_blocks got {len(blocks)} blocks for a stack of {len(self.blocks)}")
        self._check_input(x)
        if self.a.dim() == 2 and self.a.shape[1] != x.shape[-1]:
            # Checked here: the scheduler's unchecked kernels would read d values of a row of another
            # width (out of bounds when shorter) instead of failing like broadcasting does.
            raise ValueError(f"a has {self.a.shape[1]} values per layer but x has d={x.shape[-1]} "
                             "channels: per-channel a must have shape (n_layers, d)")
        if self.a.requires_grad and bool((self.a == 0).any()):
            raise ValueError("learnable a reached 0: that layer is no longer invertible")
        self.last_policy_bytes = 0
        if self.exact:
            run = self._run(blocks, x)
            out = exact_three_term(x, self.a, self.c, run, self.reversible, self)
            self._ran(run)
            return out
        a = self.a.to(self.state_dtype)
        c = self.c.to(self.state_dtype)
        if self.reversible:
            run = self._run(blocks, x)
            out = ThreeTermFunction.apply(x, a, c, run, *run.flat_params())
            self._ran(run)
            return out
        prev = cur = x.to(self.state_dtype)
        for j, block in enumerate(blocks):
            prev, cur = cur, ref.rev_step(prev, cur, checked_update(block, j, cur), a[j], c[j])
        return cur.to(x.dtype)

    def extra_repr(self):
        return f"scheme={self.scheme!r}, h={self.h}, n_layers={len(self.blocks)}" + self._memory_repr()


class HamiltonianStack(_StackBase):
    """Two-stream reversible stack (eqs. 2.8-2.9), q[0] = p[0] = x, returns p[L]:

        q[l] = a*q[l-1] + attn_l(p[l-1]);   p[l] = b*p[l-1] + mlp_l(q[l])

    attn_blocks / mlp_blocks are whole blocks with their own norms (e.g. AttentionBlock, MLPBlock).
    stored_layers counts layers l: a stored layer keeps the graphs of both attn_l and mlp_l.
    """

    def __init__(self, attn_blocks: Sequence[nn.Module], mlp_blocks: Sequence[nn.Module],
                 a: float = 1.0, b: float = 1.0, *, state_dtype: torch.dtype = torch.float32,
                 preserve_rng_state: Union[bool, str] = "auto", max_reconstruction_error: float = None,
                 exact: bool = False, stored_layers: Union[int, Sequence[int]] = 0, store_policy: str = None):
        if len(attn_blocks) != len(mlp_blocks):
            raise ValueError(f"attn_blocks has {len(attn_blocks)} blocks but mlp_blocks has {len(mlp_blocks)}")
        super().__init__(list(attn_blocks) + list(mlp_blocks), state_dtype, preserve_rng_state,
                         max_reconstruction_error, n_layers=len(attn_blocks), stored_layers=stored_layers,
                         store_policy=store_policy)
        for name, v in (("a", a), ("b", b)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(v).__name__}")
            if v == 0:
                raise ValueError(f"{name} = 0: the Hamiltonian inverse divides by {name}")
            if exact:
                check_unit_coefficient(name, v)
        self.exact = bool(exact)
        self.attn_blocks = nn.ModuleList(attn_blocks)
        self.mlp_blocks = nn.ModuleList(mlp_blocks)
        self.a, self.b = float(a), float(b)
        self._warn_if_runaway((max(1.0, 1 / abs(self.a)) * max(1.0, 1 / abs(self.b))) ** len(attn_blocks))

    def _interleaved(self):
        return [blk for pair in zip(self.attn_blocks, self.mlp_blocks) for blk in pair]

    def _stored_blocks(self):
        return frozenset(j for l in self.stored_layers for j in (2 * l, 2 * l + 1))

    def forward(self, p0, q0=None, return_both=False):
        """p[L] from p[0] = p0 and q[0] = q0 (p0 when None); (q[L], p[L]) when return_both.
        Gradients reach both initial streams."""
        self._check_input(p0)
        two_streams = q0 is not None
        if not two_streams:
            q0 = p0.view_as(p0)    # a distinct tensor object: Dynamo refuses one tensor passed twice
        else:
            self._check_input(q0)
            if q0.shape != p0.shape or q0.device != p0.device:
                raise ValueError(f"q0 {tuple(q0.shape)} on {q0.device} must match p0 {tuple(p0.shape)} on {p0.device}")
        self.last_policy_bytes = 0
        if self.exact:
            if two_streams or return_both:
                raise ValueError("exact=True HamiltonianStack takes one initial stream (q0=None) and "
                                 "returns p[L] (return_both=False)")
            run = self._run(self._interleaved(), p0)
            out = exact_hamiltonian(p0, self.a, self.b, run, self.reversible, self)
            self._ran(run)
            return out
        if self.reversible:
            run = self._run(self._interleaved(), p0, q0)
            q, p = HamiltonianFunction.apply(p0, q0, self.a, self.b, run, *run.flat_params())
            self._ran(run)
        else:
            q, p = q0.to(self.state_dtype), p0.to(self.state_dtype)
            for l, (attn, mlp) in enumerate(zip(self.attn_blocks, self.mlp_blocks)):
                q = ref.coupling_step(q, checked_update(attn, 2 * l, p), self.a)
                p = ref.coupling_step(p, checked_update(mlp, 2 * l + 1, q), self.b)
            q, p = q.to(q0.dtype), p.to(p0.dtype)
        return (q, p) if return_both else p

    def extra_repr(self):
        return f"a={self.a}, b={self.b}, n_layers={len(self.attn_blocks)}" + self._memory_repr()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `causal_attention` (FlashAttention or SDPA), or through
    the running step's KV cache when one is active (`revkernels.kv_cache`: one slot per call)."""

    def __init__(self, d_model, n_heads, dropout=0.0, bias=True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout.p if self.training else 0.0
        cache = active_cache()
        attend = causal_attention if cache is None else cache.attend
        y = attend(q, k, v, dropout_p=p).transpose(1, 2).reshape(B, T, d)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """GELU MLP of width 4d: W2 gelu(W1 x)."""

    def __init__(self, d_model, dropout=0.0, bias=True):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.proj = nn.Linear(4 * d_model, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class AttentionBlock(nn.Module):
    """Attn(LN1(x)): the attention half of a block, with its own norm."""

    def __init__(self, d_model, n_heads, dropout=0.0, bias=True):
        super().__init__()
        self.ln = nn.LayerNorm(d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout, bias)

    def forward(self, x):
        return self.attn(self.ln(x))


class MLPBlock(nn.Module):
    """MLP(LN2(x)): the MLP half of a block, with its own norm."""

    def __init__(self, d_model, dropout=0.0, bias=True):
        super().__init__()
        self.ln = nn.LayerNorm(d_model, bias=bias)
        self.mlp = MLP(d_model, dropout, bias)

    def forward(self, x):
        return self.mlp(self.ln(x))


class TransformerBlock(nn.Module):
    """The update f(p) = Attn(LN1(p)) + MLP(LN2(p + Attn(LN1(p))))  (eq. 2.5), pre-LN GPT block.
    A residual layer is p + f(p); reversible stacks use f alone."""

    def __init__(self, d_model, n_heads, dropout=0.0, bias=True):
        super().__init__()
        self.attn = AttentionBlock(d_model, n_heads, dropout, bias)
        self.mlp = MLPBlock(d_model, dropout, bias)

    def forward(self, p):
        u = self.attn(p)
        return u + self.mlp(p + u)
