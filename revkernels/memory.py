"""Device-independent activation-memory measurements (DESIGN section 4).

- saved_tensor_bytes: bytes autograd packs for backward while `fn` runs (saved_tensors_hooks),
  counting each storage once. Parameters saved by e.g. a Linear's backward count too unless
  excluded (`SavedTensorBytes(exclude=model.parameters())`): they are not activation memory.
- live_tensor_bytes: bytes of every tensor storage alive now, minus excluded ones (parameters,
  inputs); taken between forward and backward it shows what the graph holds. Found by a gc scan
  of Python tensor objects plus a walk of the autograd graphs they reach, whose saved tensors may
  have no Python object (e.g. a LayerNorm's mean/rstd, an attention's logsumexp).
"""
import gc

import torch
from torch._subclasses.fake_tensor import FakeTensor


def _storage_key(t):
    s = t.untyped_storage()
    return s.data_ptr(), s.device


class SavedTensorBytes:
    """Context manager: `.bytes` is the total of distinct storages saved for backward inside it."""

    def __init__(self, exclude=()):
        self.bytes = 0
        self._seen = set()
        self._skip = {_storage_key(t) for t in exclude}

    def _pack(self, t):
        key = _storage_key(t)
        if key not in self._seen and key not in self._skip:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def saved_tensor_bytes(fn, *args, **kwargs):
    """(fn(*args, **kwargs), bytes of tensors autograd saved for its backward)."""
    with SavedTensorBytes() as m:
        out = fn(*args, **kwargs)
    return out, m.bytes


def _graph_saved_tensors(roots):
    """Tensors saved by the autograd nodes reachable from `roots` (grad_fns), including those of
    custom Functions and torch.compile'd graphs (`saved_tensors`); saved values already freed by a
    backward are skipped. Every attribute read is guarded: on a freed node even `hasattr` raises
    RuntimeError, not AttributeError."""
    stack, visited = list(roots), set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for name in [*(n for n in dir(node) if n.startswith("_saved_")), "saved_tensors"]:
            try:
                value = getattr(node, name)
            except Exception:  # absent, or freed by a backward without retain_graph
                continue
            for v in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(v, torch.Tensor):
                    yield v
        stack.extend(fn for fn, _ in node.next_functions)


def live_tensor_bytes(exclude=()):
    """Bytes of the distinct storages of all live tensors, skipping those of `exclude`
    (an iterable of tensors, e.g. model.parameters() and the inputs)."""
    skip = {_storage_key(t) for t in exclude}
    seen, total = set(), 0
    gc.collect()
    tensors, roots = [], []
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor) or issubclass(type(obj), FakeTensor):
            continue  # FakeTensors (left by torch.compile tracing) own no memory
        tensors.append(obj)
        try:
            if obj.grad_fn is not None:
                roots.append(obj.grad_fn)
        except Exception:  # tensor subclasses that refuse attribute access
            pass
    for t in (*tensors, *_graph_saved_tensors(roots)):
        try:
            if t.device.type == "meta":
                continue
            key = _storage_key(t)
        except Exception:  # tensor subclasses / freed storages without a data pointer
            continue
        if key in skip or key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total
