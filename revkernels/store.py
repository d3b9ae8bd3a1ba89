"""Selective storing inside a recomputed block (``store_policy="matmuls"``).

A reversible stack recomputes each block in the backward. With a store policy, the forward keeps the
outputs of the block's expensive ops (matrix products and fused attention, as torchtitan's selective
activation checkpointing "op" mode does) and the backward's recompute returns those outputs instead
of running the ops again; norms, activations and adds are recomputed. The block input is not kept: the
reversible backward rebuilds it.

Storing and replaying are PyTorch's own: ``torch.utils.checkpoint.create_selective_checkpoint_contexts``
gives a (caching, cached) pair of dispatch modes sharing one storage, here one pair per block call. As
inside ``checkpoint``, the forward runs the block with grad enabled on a detached input that requires
grad, so it dispatches exactly the ops the recompute will (some ops change with grad mode, e.g. a
matmul folding or an attention computing its logsumexp), while a saved-tensor hook drops everything
autograd would save: the forward keeps no graph, only the policy's outputs. In float mode the stored
outputs are those of the forward's input and the recompute sees the rebuilt state (equal up to the
reconstruction drift); in exact mode they are the same bits.
"""
from typing import Optional

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

STORE_POLICIES = ("matmuls",)

_aten = torch.ops.aten
MATMUL_OPS = frozenset(getattr(_aten, name).default for name in (
    "mm", "addmm", "bmm", "baddbmm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(_aten, name))


def check_store_policy(store_policy) -> Optional[str]:
    """store_policy validated: None or one of STORE_POLICIES."""
    if store_policy is not None and store_policy not in STORE_POLICIES:
        raise ValueError(f"store_policy must be None or one of {STORE_POLICIES}, got {store_policy!r}")
    return store_policy


def _dropout_p(func, args, kwargs):
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            return kwargs.get("dropout_p", args[i] if i < len(args) else arg.default_value)
    return 0.0


def _storable(func, args, kwargs):
    """A matmul or attention op whose skipping in the recompute leaves the RNG stream alone: an
    attention with dropout draws random numbers that later ops of the block (a residual dropout)
    must see consumed, so it is recomputed."""
    if func not in MATMUL_OPS:
        return False
    return not (torch.Tag.nondeterministic_seeded in func.tags and _dropout_p(func, args, kwargs) > 0)


def _discard(_):
    return None


def _never_unpacked(_):
    raise RuntimeError("revkernels.store: a block's forward graph was kept although the store policy "
                       "drops it (a tensor it saved was read)")


class _KeptBytes(TorchDispatchMode):
    """Adds to `store.bytes` the distinct storages of the outputs the policy keeps (the ops `_storable`
    selects). Entered above the caching mode, it sees each op's output as that mode stores it. (The
    policy's own context carries no op output in older torch releases.)"""

    def __init__(self, store):
        super().__init__()
        self.store = store

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _storable(func, args, kwargs):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    if s.data_ptr() not in self.store._seen:
                        self.store._seen.add(s.data_ptr())
                        self.store.bytes += s.nbytes()
        return out


class BlockStore:
    """The outputs the store policy keeps for one block call. `record(block, x)` runs the forward;
    `replay()` is the context for the recompute, which consumes them. `bytes`: their total size
    (distinct storages), which saved-tensor hooks do not see."""

    def __init__(self, store_policy: str):
        check_store_policy(store_policy)
        self.bytes = 0
        self._seen = set()
        self._caching, self._cached = create_selective_checkpoint_contexts(self._policy)

    @staticmethod
    def _policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if _storable(func, args, kwargs) else CheckpointPolicy.PREFER_RECOMPUTE

    def record(self, block, x):
        """block(x) detached, keeping the policy's op outputs (and nothing autograd would save).
        Runs with Dynamo off, as the backward's recompute does: under a whole-model torch.compile
        with graph breaks, Dynamo would otherwise compile the block's frames here and run other ops
        than the eager recompute (blocks compiled on their own stay compiled in both)."""
        inp = x.detach().requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_discard, _never_unpacked), \
                self._caching, _KeptBytes(self):
            out = torch.compiler.disable(block)(inp)
        return out.detach() if isinstance(out, torch.Tensor) else out

    def replay(self):
        return self._cached
