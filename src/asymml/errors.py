"""Exceptions with messages that say what is wrong and what to do."""

from __future__ import annotations


class AsymmlError(Exception):
    """Base class for asymml errors."""


class UntraceableModelError(AsymmlError, TypeError):
    """torch.fx could not trace the model."""


class UnsupportedOperationError(AsymmlError, NotImplementedError):
    """Strict mode met an op that has no split rule and is not known to be non-linear."""


class ConfigError(AsymmlError, ValueError):
    """An invalid option value."""


class InputError(AsymmlError, ValueError):
    """An input tensor the split model cannot take (shape, dtype, NaN/Inf)."""


class CheckpointError(AsymmlError, ValueError):
    """A corrupt checkpoint, or one from another model/config."""
