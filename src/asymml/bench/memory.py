"""Trusted peak memory for the bench (kept as a name for compatibility): the core
:class:`~asymml.profiling.TrustedMemoryMeter` already ignores op outputs that alias an op input (views of
parameters such as ``weight.t()`` inside ``F.linear``, in-place results), which allocate nothing."""

from __future__ import annotations

from ..profiling import TrustedMemoryMeter

AliasAwareMemoryMeter = TrustedMemoryMeter  # the core meter skips views and in-place results
