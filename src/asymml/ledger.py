"""The release ledger: every tensor the accelerator receives, as immutable records.

Privacy claims are statements about this ledger (SPEC §2). Kinds:

* ``input`` – a raw model input (only in ``plain`` mode);
* ``residual`` – an activation residual ``R`` (or ``R̃`` = clipped + noised);
* ``activation`` – a whole activation (``noise-only`` mode, clipped + noised);
* ``grad_residual`` – an activation-gradient residual (``protected`` backward);
* ``grad`` – a full activation gradient (``paper`` backward, ``plain`` mode);
* ``weight`` – a parameter or buffer. Visible to the accelerator by design (it computes with it), but not
  public data: a weight released *again* (after an optimizer step) derives from the private batches it was
  trained on, and eval-mode BatchNorm statistics (``running_*``) are statistics of private data. Such
  records carry ``private_derived=True``; an ε covers them only when the run noises its updates (DP-SGD).
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
    private_derived: bool = True  # False only for a weight's first release (its initial, public value)


class Ledger(list):
    """A list of :class:`Release` plus byte counters that are kept even when not auditing."""

    def __init__(self, audit: bool = False) -> None:
        super().__init__()
        self.audit = audit
        self.bytes_by_kind: Counter[str] = Counter()
        self.count_by_kind: Counter[str] = Counter()
        self.derived_weight_bytes = 0
        self._n = 0
        self._weights_seen: set[str] = set()  # kept across reset(): a weight seen once is public, then derived

    def record(self, layer: str, kind: str, tensor: Tensor) -> None:
        """Account one release; keep a snapshot of the tensor when auditing."""
        if kind not in KINDS:
            raise ValueError(f"unknown release kind {kind!r}")
        nbytes = tensor.numel() * tensor.element_size()
        self.bytes_by_kind[kind] += nbytes
        self.count_by_kind[kind] += 1
        derived = kind in PRIVATE_DERIVED
        if kind == "weight":
            derived = layer in self._weights_seen or "running_" in layer.rsplit(".", 1)[-1]
            self._weights_seen.add(layer)
            self.derived_weight_bytes += nbytes if derived else 0
        if self.audit:
            snap = tensor.detach().to("cpu", copy=True)
            self.append(Release(self._n, layer, kind, tuple(tensor.shape), snap, derived))
        self._n += 1

    def private_bytes(self) -> int:
        """Bytes of released tensors that derive from private data (everything but weights)."""
        return sum(v for k, v in self.bytes_by_kind.items() if k in PRIVATE_DERIVED)

    def reset(self) -> None:
        self.clear()
        self.bytes_by_kind.clear()
        self.count_by_kind.clear()
        self.derived_weight_bytes = 0
        self._n = 0

    def by_kind(self, kind: str) -> list[Release]:
        return [r for r in self if r.kind == kind]
