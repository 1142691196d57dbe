"""The runtime's view of the split options: :class:`SplitConfig` (rank specs resolved to policies).

Built by :func:`asymml.api.split_with_options` from a validated :class:`~asymml.options.SplitOptions`;
read by the runtime, the region runner and the release path, which is why it sits below all three.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decomposition import RankPolicy
from .profiling import EPC_DEFAULT_BYTES

MODES = ("asym", "plain", "trusted-only", "noise-only")
BACKWARDS = ("protected", "paper")


@dataclass
class SplitConfig:
    """Everything that decides how a model is split (validated by :func:`asymml.split`)."""

    rank: RankPolicy
    decomposition: str = "power"
    iters: int = 2
    basis: str = "sample"
    backward: str = "protected"
    mode: str = "asym"
    input_rank: int | None = 1
    grad_rank: RankPolicy | None = None
    warm_start: bool = True
    strict: bool = False
    noise_grads: bool = True
    epc_bytes: int = EPC_DEFAULT_BYTES
    seed: int = 0
    noise_seed: int | None = None
    placement: str = "auto"
    micro_batch: int | None = None
