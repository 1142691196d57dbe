"""The façade: :func:`split` turns any fx-traceable CNN into a split model (SPEC §5)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from .decomposition import RankPolicy
from .errors import ConfigError
from .executors.base import Executor
from .executors.local import LocalExecutor
from .options import VERIFY_SAMPLE, SplitOptions
from .profiling import EPC_DEFAULT_BYTES
from .runtime import SplitConfig, SplitModule


def _mechanism(noise: Any) -> Any:
    """Turn the ``noise`` argument into a release mechanism (or ``None``)."""
    if noise is None:
        return None
    from .privacy.noise import NoiseConfig, ReleaseMechanism

    if isinstance(noise, ReleaseMechanism) or callable(noise) and not isinstance(noise, (int, float)):
        return noise
    if isinstance(noise, bool):
        raise ConfigError(f"invalid noise {noise!r}; pass a sigma (float), a NoiseConfig or a ReleaseMechanism")
    try:
        if isinstance(noise, (int, float)):
            noise = NoiseConfig(sigma=float(noise))
        if isinstance(noise, dict):
            noise = NoiseConfig(**noise)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid noise: {e}") from None
    if not isinstance(noise, NoiseConfig):
        raise ConfigError(f"invalid noise {noise!r}; pass a sigma (float), a NoiseConfig or a ReleaseMechanism")
    try:
        noise.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if noise.epsilon is not None:
        raise ConfigError(
            "noise given as a target epsilon: sigma depends on the planned run (steps, releases per step); "
            "solve it with asymml.privacy.solve_sigma and pass NoiseConfig(sigma=...), or use `asymml train "
            "--epsilon`, which does this for you"
        )
    return ReleaseMechanism(noise)


def split(
    model: nn.Module,
    rank: int | list[int] | str | RankPolicy = "schedule",
    decomposition: str = "power",
    backward: str = "protected",
    noise: Any = None,
    mode: str = "asym",
    executor: Executor | None = None,
    audit: bool = False,
    *,
    iters: int = 2,
    basis: str = "sample",
    input_rank: int | None = 1,
    grad_rank: int | str | RankPolicy | None = None,
    warm_start: bool = True,
    strict: bool = False,
    epc_bytes: int = EPC_DEFAULT_BYTES,
    seed: int = 0,
    noise_seed: int | None = None,
    placement: str = "auto",
    verify: bool | None = None,
    micro_batch: int | None = None,
    verify_sample: float = VERIFY_SAMPLE,
) -> SplitModule:
    """Split ``model`` between the trusted context (this process) and ``executor`` (the accelerator).

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace. Never modified; its parameters are trained.
        rank: fixed int, per-point list, ``"schedule"`` (prototype 2→×2→32), ``"adaptive:τ"`` or a policy.
        decomposition: ``"power"`` (light subspace iteration), ``"eigh"``, ``"svd"`` or ``"rsvd"``.
        backward: ``"protected"`` (only gradient residuals released) or ``"paper"`` (as the prototype).
        noise: ``None``, a noise multiplier σ, a :class:`~asymml.privacy.NoiseConfig` or a mechanism.
        mode: ``"asym"``, ``"plain"``, ``"trusted-only"`` or ``"noise-only"``.
        executor: defaults to ``LocalExecutor("cpu")``.
        audit: record a snapshot of every release in ``executor.ledger``.
        iters: power-iteration rounds. basis: ``"sample"`` (per-sample U) or ``"batch"`` (shared U).
        input_rank: rank of the raw input's decomposition (``None``: use ``rank``).
        grad_rank: rank for gradient decomposition in protected mode (default: the layer's forward rank).
        strict: refuse ops that have no split rule and are not known to be non-linear.
        epc_bytes: trusted memory budget the profile compares against.
        placement: ``"auto"`` (a cost model calibrated on this machine keeps a layer fully trusted —
            releasing nothing for it — when splitting it would not save trusted time), ``"split"`` (split
            every layer that can be split, as the prototype) or ``"trusted"``.
        seed: seeds the decomposition's random starts. noise_seed: seeds the DP noise — leave it ``None``
            (OS entropy) in real use: anyone who knows the seed can regenerate and subtract the noise.
        verify: check every accelerator result (shape, dtype, finiteness and randomized Freivalds checks of
            forward results, input and weight gradients); a failed check raises
            :class:`~asymml.errors.IntegrityError`. ``None`` keeps the executor's default (on for
            :class:`~asymml.executors.RemoteExecutor`, off for :class:`~asymml.executors.LocalExecutor`).
        verify_sample: with verification on, the share of each layer's jobs that also get the randomized
            check (secret draw; a layer's first jobs and one in every 8 always do); 1 checks every job.
        micro_batch: run inference (no autograd) in micro-batches of this many samples, so the trusted
            side holds one micro-batch's activations at a time (an enclave-sized working set); results are
            those of the whole batch. Training (autograd on) keeps the whole batch.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    options = SplitOptions(rank=rank, decomposition=decomposition, backward=backward, mode=mode, iters=iters,
                           basis=basis, input_rank=input_rank, grad_rank=grad_rank, warm_start=warm_start,
                           strict=strict, epc_bytes=epc_bytes, seed=seed, noise_seed=noise_seed, audit=audit,
                           placement=placement, verify=verify, micro_batch=micro_batch,
                           verify_sample=verify_sample)
    return split_with_options(model, options, noise=noise, executor=executor)


def split_with_options(model: nn.Module, options: SplitOptions, *, noise: Any = None,
                       executor: Executor | None = None) -> SplitModule:
    """:func:`split` for callers that hold a :class:`~asymml.options.SplitOptions` (training and bench
    configs embed one): ``options`` are already validated; ``noise`` and ``executor`` are objects."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(options, SplitOptions):
        raise ConfigError(f"options must be SplitOptions, got {type(options).__name__}")
    mech = _mechanism(noise)
    if mech is not None and options.mode in ("plain", "trusted-only"):
        raise ConfigError(f"noise has no effect in mode {options.mode!r}: use 'asym' or 'noise-only'")
    if executor is None:
        executor = LocalExecutor("cpu")
    if not isinstance(executor, Executor):
        raise ConfigError(f"executor must be an asymml Executor, got {type(executor).__name__}")
    if options.audit:
        executor.ledger.audit = True
    if options.verify is not None:  # None keeps the executor's default (on for remote executors)
        executor.verify = options.verify
    executor.set_verify_sample(options.verify_sample)
    return SplitModule(model, _runtime_config(options), executor, mech)


def _runtime_config(options: SplitOptions) -> SplitConfig:
    """The runtime's view of the options: rank specs resolved to policies."""
    values = {f.name: getattr(options, f.name) for f in dataclasses.fields(SplitConfig) if hasattr(options, f.name)}
    values.update(rank=options.rank_policy, grad_rank=options.grad_rank_policy)
    return SplitConfig(**values)
