"""The façade: :func:`split` turns any fx-traceable CNN into a split model (SPEC §5)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .decomposition import BASES, METHODS, RankPolicy, parse_rank
from .errors import ConfigError
from .executors.base import Executor
from .executors.local import LocalExecutor
from .profiling import EPC_DEFAULT_BYTES
from .runtime import BACKWARDS, MODES, SplitConfig, SplitModule


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"invalid {name} {value!r}; allowed: {', '.join(allowed)}")
    return value


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
        seed: seeds the decomposition's random starts. noise_seed: seeds the DP noise — leave it ``None``
            (OS entropy) in real use: anyone who knows the seed can regenerate and subtract the noise.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    _choice("mode", mode, MODES)
    _choice("backward", backward, BACKWARDS)
    _choice("decomposition", decomposition, METHODS)
    _choice("basis", basis, BASES)
    try:
        policy = parse_rank(rank)
        gpolicy = None if grad_rank is None else parse_rank(grad_rank)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if input_rank is not None and (isinstance(input_rank, bool) or not isinstance(input_rank, int) or input_rank < 1):
        raise ConfigError(f"input_rank must be a positive integer or None, got {input_rank!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"iters must be a positive integer, got {iters!r}")
    if not isinstance(epc_bytes, int) or epc_bytes <= 0:
        raise ConfigError(f"epc_bytes must be a positive integer, got {epc_bytes!r}")
    mech = _mechanism(noise)
    if mech is not None and mode in ("plain", "trusted-only"):
        raise ConfigError(f"noise has no effect in mode {mode!r}: use 'asym' or 'noise-only'")
    if executor is None:
        executor = LocalExecutor("cpu")
    if not isinstance(executor, Executor):
        raise ConfigError(f"executor must be an asymml Executor, got {type(executor).__name__}")
    if audit:
        executor.ledger.audit = True
    cfg = SplitConfig(rank=policy, decomposition=decomposition, iters=iters, basis=basis, backward=backward,
                      mode=mode, input_rank=input_rank, grad_rank=gpolicy, warm_start=warm_start, strict=strict,
                      epc_bytes=epc_bytes, seed=seed, noise_seed=noise_seed)
    return SplitModule(model, cfg, executor, mech)
