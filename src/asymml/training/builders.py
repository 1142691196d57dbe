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
    """The :class:`~asymml.privacy.NoiseConfig` of ``cfg`` (None without noise); a bad value raises
    :class:`ConfigError` from NoiseConfig's own validation."""
    from ..privacy import NoiseConfig

    return NoiseConfig.from_options(sigma=cfg.noise, nsr=cfg.nsr, epsilon=cfg.epsilon, delta=cfg.delta,
                                    clip=cfg.clip)


def build_executor(cfg: TrainConfig, device: str | None = None) -> Any:
    """The executor of ``--device`` (local, or a remote accelerator server) with ``--request-timeout``, the
    TLS options, ``--insecure`` and ``--verify``.  An option this asymml's executors do not take is an error
    when it is set, and left out when it is at its default."""
    from ..executors import remote

    dev = device or cfg.device
    is_remote = dev.startswith(("tcp://", "unix://"))
    options: dict[str, Any] = {"tls_cert": cfg.tls_cert, "tls_key": cfg.tls_key, "tls_ca": cfg.tls_ca,
                               "insecure": cfg.insecure, "verify": cfg.verify}
    if is_remote:
        options["timeout"] = cfg.request_timeout
    accepted = inspect.signature(remote.make_executor).parameters
    kw: dict[str, Any] = {}
    for name, value in options.items():
        if name in accepted:
            kw[name] = value
        elif value not in (None, False) and name != "timeout":
            raise ConfigError(f"--{name.replace('_', '-')} is not supported by this asymml's executors; drop it "
                              "or update asymml")
    return remote.make_executor(dev, **kw)


def accelerator_name(executor: Any) -> str:
    """What the accelerator is, for the terminal and the summary: the server's address for a remote
    executor (``tcp://host:port (cuda:0)``), else the local device (``cpu``, ``cuda:0``)."""
    address = getattr(executor, "address", None)
    device = getattr(executor, "device", None)
    if address is not None:
        return f"{address} ({device})" if device is not None else str(address)
    return str(device)


def build_split(model: nn.Module, cfg: TrainConfig, *, noise: Any = None, device: str | None = None) -> Any:
    """:func:`asymml.api.split_with_options` of ``model`` with ``cfg.split_options()`` (``noise`` as given) on
    the executor of ``cfg`` (``device``: another accelerator than ``cfg.device``, e.g. a rank's)."""
    from ..api import split_with_options

    options = cfg.split_options()  # before the executor: a bad option opens no connection
    executor = build_executor(cfg, device)
    try:
        return split_with_options(model, options, noise=noise, executor=executor)
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
