"""Device-independent activation-memory measurements (DESIGN section 4).

- saved_tensor_bytes: bytes autograd packs for backward while `fn` runs (saved_tensors_hooks),
  counting each storage once.
- live_tensor_bytes: bytes of every tensor storage alive now (a gc scan), minus excluded ones
  (parameters, inputs); taken between forward and backward it shows what the graph holds.
"""
import gc

import torch


def _storage_key(t):
    s = t.untyped_storage()
    return s.data_ptr(), s.device


class SavedTensorBytes:
    """Context manager: `.bytes` is the total of distinct storages saved for backward inside it."""

    def __init__(self):
        self.bytes = 0
        self._seen = set()

    def _pack(self, t):
        key = _storage_key(t)
        if key not in self._seen:
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


def live_tensor_bytes(exclude=()):
    """Bytes of the distinct storages of all live tensors, skipping those of `exclude`
    (an iterable of tensors, e.g. model.parameters() and the inputs)."""
    skip = {_storage_key(t) for t in exclude}
    seen, total = set(), 0
    gc.collect()
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor) or obj.device.type == "meta":
                continue
            key = _storage_key(obj)
        except Exception:  # tensor subclasses / freed storages without a data pointer
            continue
        if key in skip or key in seen:
            continue
        seen.add(key)
        total += obj.untyped_storage().nbytes()
    return total
