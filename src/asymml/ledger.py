"""The release ledger: every tensor the accelerator receives, as immutable records.

Privacy claims are statements about this ledger (SPEC §2). Kinds:

* ``input`` – a raw model input (only in ``plain`` mode);
* ``residual`` – an activation residual ``R`` (or ``R̃`` = clipped + noised);
* ``activation`` – a whole activation (``noise-only`` mode, clipped + noised);
* ``grad_residual`` – an activation-gradient residual (``protected`` backward);
* ``grad`` – a full activation gradient (``paper`` backward, ``plain`` mode);
* ``weight`` – a public parameter or buffer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import Tensor

KINDS = ("input", "residual", "activation", "grad_residual", "grad", "weight")
PRIVATE_DERIVED = ("input", "residual", "activation", "grad_residual", "grad")


@dataclass(frozen=True)
class Release:
    """One tensor handed to the accelerator."""

    index: int
    layer: str
    kind: str
    shape: tuple[int, ...]
    tensor: Tensor | None  # a snapshot (clone) in audit mode, else None


class Ledger(list):
    """A list of :class:`Release` plus byte counters that are kept even when not auditing."""

    def __init__(self, audit: bool = False) -> None:
        super().__init__()
        self.audit = audit
        self.bytes_by_kind: Counter[str] = Counter()
        self.count_by_kind: Counter[str] = Counter()
        self._n = 0

    def record(self, layer: str, kind: str, tensor: Tensor) -> None:
        """Account one release; keep a snapshot of the tensor when auditing."""
        if kind not in KINDS:
            raise ValueError(f"unknown release kind {kind!r}")
        self.bytes_by_kind[kind] += tensor.numel() * tensor.element_size()
        self.count_by_kind[kind] += 1
        if self.audit:
            snap = tensor.detach().to("cpu", copy=True)
            self.append(Release(self._n, layer, kind, tuple(tensor.shape), snap))
        self._n += 1

    def private_bytes(self) -> int:
        """Bytes of released tensors that derive from private data (everything but weights)."""
        return sum(v for k, v in self.bytes_by_kind.items() if k in PRIVATE_DERIVED)

    def reset(self) -> None:
        self.clear()
        self.bytes_by_kind.clear()
        self.count_by_kind.clear()
        self._n = 0

    def by_kind(self, kind: str) -> list[Release]:
        return [r for r in self if r.kind == kind]
