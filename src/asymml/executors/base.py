"""The executor interface: how the trusted context talks to an (untrusted) accelerator.

Modelled on CrypTen's communicator: one small interface, an in-process implementation
(:class:`~asymml.executors.local.LocalExecutor`) and a remote one (the accelerator server). Everything
crosses by value: the trusted side *releases* tensors (recorded in the ledger), ships public programs and
parameters, and gets results back as tensors. No Python object is shared between the two sides.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..ledger import Ledger
from .ops import Instr


@dataclass(frozen=True)
class Handle:
    """An opaque reference to a tensor held by the accelerator."""

    id: int
    shape: tuple[int, ...]


@dataclass
class BackwardRequest:
    """What the trusted side wants back from a region's accelerator backward."""

    grad_outputs: dict[str, Handle | None]
    input_grads: list[str]        # residual inputs → the accelerator part of ∇X
    param_grads: list[str]        # heavy weights → the R̃⋆δ_R term
    value_grads: list[str]        # intermediate values → the accelerator part of δ at that point
    values: list[str]             # intermediate residual values (public) the trusted side needs


class Executor(ABC):
    """An accelerator, reached asynchronously. Implementations must record releases in ``ledger``."""

    ledger: Ledger
    device: torch.device
    #: the accelerator computes on the trusted side's own CPU cores (an in-process CPU executor): overlapping
    #: the two shares gains nothing there, so the runtime may wait first and merge inside its GEMM
    shares_trusted_cores: bool = False

    # -- result verification (see asymml.executors.verify)
    #: executors that check their results with a :class:`~asymml.executors.verify.Verifier` set this
    can_verify: bool = False
    verifier: Any = None

    def set_verify_sample(self, sample: float) -> None:
        """Check ``sample`` (in (0, 1]) of each layer's jobs with the randomized projection check when
        verification is on (see :class:`~asymml.executors.verify.Verifier`)."""
        if self.verifier is not None and self.verifier.sample != sample:
            self.verifier = self._new_verifier(sample)

    def _new_verifier(self, sample: float | None = None) -> Any:
        """A :class:`~asymml.executors.verify.Verifier` for this executor. Its checks stream on all torch
        threads where the accelerator is the trusted side's own cores (its jobs already run there with
        those threads, and the trusted side waits for each result it checks: replayed VGG-16 224 px checks
        took 25-37% less time than on one thread); elsewhere they run on one thread, beside a trusted side
        that may be computing its share while a result arrives."""
        from .verify import SAMPLE, Verifier

        return Verifier(device_type=self.device.type, sample=SAMPLE if sample is None else sample,
                        threads=None if self.shares_trusted_cores else 1)

    @property
    def verify(self) -> bool:
        """Whether every accelerator result is checked before use."""
        return self.verifier is not None

    @verify.setter
    def verify(self, on: bool) -> None:
        if on and not self.can_verify:
            from ..errors import ConfigError

            raise ConfigError(f"{type(self).__name__} cannot verify accelerator results")
        if on and self.verifier is None:
            self.verifier = self._new_verifier()
        elif not on:
            self.verifier = None

    # -- data that derives from private data
    @abstractmethod
    def release(self, tensor: Tensor, *, layer: str, kind: str) -> Handle:
        """Hand ``tensor`` to the accelerator (by value). Every call is a release in the ledger."""

    # -- region programs
    @abstractmethod
    def forward(
        self,
        key: int,
        program: list[Instr],
        inputs: dict[str, Handle],
        params: dict[str, Tensor],
        outputs: list[str],
        *,
        layer: str,
        keep_graph: bool,
        grad_params: tuple[str, ...] = (),
    ) -> Future[dict[str, Tensor | None]]:
        """Run ``program`` on the residual inputs; resolve to the named outputs (fetched back)."""

    @abstractmethod
    def backward(self, key: int, request: BackwardRequest) -> Future[dict[str, dict[str, Tensor | None]]]:
        """Back-propagate released output gradients through the kept graph of forward ``key``."""

    @abstractmethod
    def free(self, key: int) -> None:
        """Drop everything kept for forward ``key``."""

    # -- whole-model execution (``plain`` mode)
    def run_module(self, module: torch.nn.Module, inputs: tuple[Any, ...], *, layer: str) -> Any:
        raise NotImplementedError(f"{type(self).__name__} cannot run whole modules (plain mode)")

    # -- profiling
    def stats(self) -> dict[str, dict[str, float]]:
        """Per-layer accelerator time (s) and FLOPs since the last reset."""
        return {}

    def reset_stats(self) -> None:
        pass

    def set_profiling(self, on: bool) -> None:
        pass

    def close(self) -> None:
        pass
