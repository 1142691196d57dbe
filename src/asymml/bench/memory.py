"""Trusted peak memory for the bench: :class:`~asymml.profiling.TrustedMemoryMeter` that ignores op outputs
aliasing an op input.

The stock meter counts the storage of every op output it has not seen yet. A view of a tensor created
outside the meter (``weight.t()`` inside ``F.linear``, a ``view`` of a parameter) has such a storage, so
the whole parameter was counted as a trusted allocation — torchvision VGG-16's 392 MiB classifier weight,
for instance, on every step. Outputs that share storage with an input (views, in-place ops) allocate
nothing; this meter skips them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ..profiling import TrustedMemoryMeter


def _storage_key(t: Any) -> int | None:
    if not isinstance(t, torch.Tensor) or t.is_meta:
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class AliasAwareMemoryMeter(TrustedMemoryMeter):
    """Peak bytes of storages *allocated* by the trusted thread (views and in-place results not counted)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in, _ = tree_flatten((args, kwargs or {}))
        aliased = {k for k in map(_storage_key, flat_in) if k}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if _storage_key(t) not in aliased:
                self._track(t)
        return out
