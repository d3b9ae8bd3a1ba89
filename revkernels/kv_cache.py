"""KV cache for incremental decoding: one slot per attention call, in call order within one forward.

A forward of any of the package's bodies calls its attention layers in a fixed order: once per layer
for a residual or three-term stack, once per attention block for the Hamiltonian stack, and several
times per layer for a retrofitted stack (eq. 4.5 evaluates f_{j-1} again at p_hat inside F_j). Every
call is a causal map of its input sequence, and every input is a causal function of the tokens, so the
keys and values a call computed for earlier positions stay valid when tokens are appended. The cache
therefore keys on the call's index i within one forward, whatever the scheme:

    prefill (cache empty, T tokens):  y_i = softmax(q_i k_i^T / sqrt(hd) + causal mask) v_i,
                                      K_i[:, :, :T] = k_i,  V_i[:, :, :T] = v_i
    decode (one token at position t): K_i[:, :, t] = k_i,  V_i[:, :, t] = v_i,
                                      y_i = softmax(q_i K_i[:, :, :t+1]^T / sqrt(hd)) V_i[:, :, :t+1]
                                      (the single query sees every cached key: no mask)

Use: `with cache.step(n_new): model_body(...)` around each forward (rk.GPT.forward does it when given
`cache=`); attention layers find the cache of the running step with `active_cache()`. A step checks
that its forward made as many attention calls as the prefill, and runs only with autograd off: the
reversible backward recomputes blocks with grad enabled, and a training forward must never write a
cache.
"""
import contextlib
import threading

import torch

from .attention import causal_attention, unmasked_attention

_THREAD = threading.local()     # .cache: the running step's KVCache (a thread-local, which torch.compile
                                # reads under a guard, unlike a ContextVar)


def active_cache():
    """The KVCache whose step is running in this thread, or None."""
    return getattr(_THREAD, "cache", None)


def _refuse_grad():
    if torch.is_grad_enabled():
        raise RuntimeError("a KV cache is used in a grad-enabled forward: caches are for generation "
                           "only (run under torch.no_grad(), as GPT.generate does); call the model "
                           "without cache= to train")


class KVCache:
    """Keys and values of every attention call of one model, for up to `capacity` positions.

    `length` is the number of positions cached. A cache that raised mid-step is broken: it refuses
    further steps instead of serving half-written slots.
    """

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self.length = 0
        self._slots = []          # per attention call: (K, V), each (B, H, capacity, hd)
        self._calls = 0           # attention calls made in the running step
        self._broken = False

    @contextlib.contextmanager
    def step(self, n_new: int):
        """Run one forward over `n_new` new tokens at positions length .. length + n_new - 1: all of the
        prompt when the cache is empty (prefill), else exactly one token (decode)."""
        _refuse_grad()
        if self._broken:
            raise RuntimeError("this KV cache was left half-written by a failed step: start a new one")
        if active_cache() is not None:
            raise RuntimeError("a KV cache step is already running: steps do not nest")
        if self.length and n_new != 1:
            raise ValueError(f"a cache holding {self.length} positions takes one new token per step, got {n_new}")
        if n_new < 1 or self.length + n_new > self.capacity:
            raise ValueError(f"{n_new} new tokens after {self.length} cached do not fit capacity={self.capacity}")
        self._calls = 0
        _THREAD.cache = self
        try:
            yield self
            if self.length and self._calls != len(self._slots):
                raise RuntimeError(f"this forward made {self._calls} attention calls but the prefill made "
                                   f"{len(self._slots)}: the cache needs the same calls in the same order")
        except BaseException:
            self._broken = True
            raise
        finally:
            _THREAD.cache = None
        self.length += n_new

    def attend(self, q, k, v, dropout_p=0.0):
        """Attention of this call's queries q (B, H, n_new, hd) over the cached and new keys/values (see
        the module docstring); stores k, v in this call's slot."""
        _refuse_grad()
        i, start, n = self._calls, self.length, q.shape[2]
        self._calls += 1
        if start == 0:                                       # prefill: a new slot per call
            K = k.new_empty(k.shape[:2] + (self.capacity, k.shape[3]))
            V = v.new_empty(v.shape[:2] + (self.capacity, v.shape[3]))
            K[:, :, :n], V[:, :, :n] = k, v
            self._slots.append((K, V))
            return causal_attention(q, k, v, dropout_p=dropout_p)
        if i >= len(self._slots):
            raise RuntimeError(f"attention call {i + 1} in this forward, but the prefill made only "
                               f"{len(self._slots)}: the cache needs the same calls in the same order")
        K, V = self._slots[i]
        if K.shape[:2] != k.shape[:2] or K.shape[3] != k.shape[3] or K.dtype != k.dtype or K.device != k.device:
            raise RuntimeError(f"attention call {i + 1} has keys {tuple(k.shape)} {k.dtype} on {k.device}, but its "
                               f"slot holds {tuple(K.shape)} {K.dtype} on {K.device}: same batch, heads and "
                               "dtype as the prefill are needed")
        K[:, :, start:start + n], V[:, :, start:start + n] = k, v
        return unmasked_attention(q, K[:, :, :start + n], V[:, :, :start + n], dropout_p=dropout_p)
