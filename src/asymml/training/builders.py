"""From a :class:`~asymml.training.config.TrainConfig` to the objects of a run: output directory, user
model (with the normalisation the run needs), noise configuration, executor, split model, learning-rate
schedule."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import ConfigError
from .config import DEFAULT_CIFAR_WIDTH, TrainConfig, is_cifar_model

__all__ = ["accelerator_name", "build_executor", "build_model", "build_split", "default_out_dir", "lr_factor",
           "noise_config", "to_group_norm"]


def default_out_dir(cfg: TrainConfig) -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<model>-<mode>`` (a numbered suffix if it exists already)."""
    stem = f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.model.replace(':', '-')}-{cfg.mode}"
    p = Path("runs") / stem
    i = 1
    while p.exists():
        i += 1
        p = Path("runs") / f"{stem}-{i}"
    return p


def to_group_norm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm replaced by a GroupNorm (``asymml.fix(model, privacy=True)``).

    Train-mode BatchNorm mixes the samples of a batch, and its running statistics are computed from private
    data without noise; GroupNorm normalises each sample on its own and has no running statistics.
    """
    from ..validate import fix

    return fix(model, privacy=True)


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The user model of ``cfg`` (random init from the global torch RNG); ``--norm group`` swaps
    BatchNorm for GroupNorm (``--norm auto`` must have been resolved by ``cfg.validate()``)."""
    from ..models import get_model

    kw: dict[str, Any] = {}
    if is_cifar_model(cfg.model):
        kw["width"] = cfg.width if cfg.width is not None else DEFAULT_CIFAR_WIDTH
    try:
        model = get_model(cfg.model, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kw)
    except TypeError as e:  # torchvision builders reject unknown keywords
        raise ConfigError(f"cannot build model {cfg.model!r}: {e}") from None
    if cfg.norm == "group":
        model = to_group_norm(model)
    return model


def noise_config(cfg: TrainConfig) -> Any:
    """The :class:`~asymml.privacy.NoiseConfig` of ``cfg`` (None without noise)."""
    from ..privacy import NoiseConfig

    try:
        return NoiseConfig.from_options(sigma=cfg.noise, nsr=cfg.nsr, epsilon=cfg.epsilon, delta=cfg.delta,
                                        clip=cfg.clip)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_executor(cfg: TrainConfig, device: str | None = None) -> Any:
    """The executor of ``--device``: local, or a remote accelerator server with ``--request-timeout`` and
    the TLS options (passed only when set, so an executor without TLS support still serves plain runs)."""
    dev = device or cfg.device
    if not dev.startswith(("tcp://", "unix://")):
        from ..executors import make_executor

        return make_executor(dev)
    from ..executors.remote import RemoteExecutor

    kw: dict[str, Any] = {"timeout": cfg.request_timeout}
    tls = {k: getattr(cfg, k) for k in ("tls_cert", "tls_key", "tls_ca") if getattr(cfg, k) is not None}
    if tls:
        accepted = inspect.signature(RemoteExecutor).parameters
        missing = [k for k in tls if k not in accepted]
        if missing:
            raise ConfigError(f"this asymml's remote executor has no TLS support ({', '.join(missing)}); "
                              "drop the --tls-* options or update asymml")
        kw.update(tls)
    return RemoteExecutor(dev, **kw)


def accelerator_name(executor: Any) -> str:
    """What the accelerator is, for the terminal and the summary: the server's address for a remote
    executor (``tcp://host:port (cuda:0)``), else the local device (``cpu``, ``cuda:0``)."""
    address = getattr(executor, "address", None)
    device = getattr(executor, "device", None)
    if address is not None:
        kind = getattr(address, "kind", None)
        if kind == "tcp":
            where = f"tcp://{address.host}:{address.port}"
        elif kind == "unix":
            where = f"unix://{address.path}"
        else:
            where = str(address)
        return f"{where} ({device})" if device is not None else where
    return str(device)


def build_split(model: nn.Module, cfg: TrainConfig, *, noise: Any = None, device: str | None = None) -> Any:
    """``asymml.split`` of ``model`` with the split options of ``cfg`` (``noise`` as given)."""
    import asymml

    executor = build_executor(cfg, device)
    try:
        return asymml.split(
            model, rank=cfg.rank_spec, decomposition=cfg.decomposition, backward=cfg.backward, noise=noise,
            mode=cfg.mode, executor=executor, iters=cfg.iters, basis=cfg.basis, input_rank=cfg.input_rank,
            grad_rank=cfg.grad_rank, warm_start=bool(cfg.warm_start), seed=cfg.seed, noise_seed=cfg.noise_seed,
        )
    except BaseException:
        executor.close()
        raise


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate multiplier as a function of the global step (a pure function of the config)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "cos":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if cfg.scheduler == "step":
        if cfg.lr_step is not None:
            every = cfg.lr_step * steps_per_epoch
            return lambda t: cfg.lr_gamma ** (t // every)
        milestones = [int(0.5 * total), int(0.75 * total)]
        return lambda t: cfg.lr_gamma ** sum(t >= m for m in milestones)
    return lambda t: 1.0
