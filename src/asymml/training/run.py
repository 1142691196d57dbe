"""From options to a run: resolve the configuration (defaults < config file < command line, or the
checkpoint's configuration when resuming), check a resumed checkpoint fits, train."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .checkpoint import check_compatible, find_checkpoint, load_checkpoint
from .config import TrainConfig, apply_accounted_defaults, load_config_file, resolve_config
from .trainer import Callback, Trainer, TrainResult

__all__ = ["prepare", "train"]


def prepare(cli: Mapping[str, Any] | None = None, config_file: str | None = None) -> tuple[TrainConfig, dict | None]:
    """The configuration of a run and, when resuming, its checkpoint.

    ``cli`` holds the options given on the command line (or as keyword arguments), ``config_file`` a YAML
    or TOML file of options.  With ``resume`` set (a checkpoint file or run directory; empty: the one in
    ``out``), the checkpoint's configuration is the base; explicitly given options that would train
    something else make it refuse (:class:`~asymml.errors.CheckpointError` naming each difference).
    """
    cli = dict(cli or {})
    file_values = load_config_file(config_file) if config_file is not None else {}
    source = f"config file {config_file}"
    probe = resolve_config(cli, file_values, source=source)
    if probe.resume is None:
        given = {str(k).replace("-", "_") for k in (*cli, *file_values)}
        return apply_accounted_defaults(probe, given).validate(), None
    target = probe.resume or probe.out
    if not target:
        raise ConfigError("--resume needs a checkpoint file or run directory (or --out DIR)")
    path = find_checkpoint(target)
    ckpt = load_checkpoint(path)
    base = TrainConfig.from_dict(ckpt["config"], source=f"checkpoint {path}")
    explicit_out = "out" in cli or "out" in {str(k).replace("-", "_") for k in file_values}
    if not explicit_out:
        base.out = str(path.parent)
    cfg = resolve_config(cli, file_values, base, source=source)
    cfg.resume = str(path)
    cfg.validate()
    check_compatible(ckpt, cfg, path)
    if Path(cfg.out or "").resolve() != path.parent.resolve() and (Path(cfg.out) / path.name).exists():
        raise ConfigError(f"--out {cfg.out!r} already holds another checkpoint; choose another --out")
    return cfg, ckpt


def train(cli: Mapping[str, Any] | None = None, config_file: str | None = None, *,
          callback: Callback | None = None, echo: Callable[[str], None] | None = None) -> TrainResult:
    """Resolve the options (see :func:`prepare`), train, and return the summary."""
    cfg, ckpt = prepare(cli, config_file)
    return Trainer(cfg, checkpoint=ckpt, callback=callback, echo=echo).fit()
