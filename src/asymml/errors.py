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


class DatasetNotFoundError(AsymmlError, FileNotFoundError):
    """The dataset's files are not on disk (and ``download`` was not requested)."""


class ManifestError(AsymmlError, ValueError):
    """A manifest (template) that does not render, parse or validate."""


class TrainingDivergedError(AsymmlError, RuntimeError):
    """The loss or the activations became NaN/Inf (the last checkpoint is kept)."""


class ProtocolError(AsymmlError, ValueError):
    """A message that does not follow the asymml wire protocol."""


class RemoteError(AsymmlError, RuntimeError):
    """The accelerator server reported an error for a request."""


class AcceleratorConnectionError(AsymmlError, ConnectionError):
    """The connection to the accelerator server failed, was lost or timed out."""


class IntegrityError(AsymmlError, RuntimeError):
    """An accelerator result failed verification (shape, dtype, finiteness or a randomized check)."""


class PrivacyConfigError(ConfigError):
    """A configuration whose reported privacy guarantee would not hold (e.g. samples coupled under noise)."""


class PeerLostError(AsymmlError, ConnectionError):
    """Another rank of a data-parallel run died, hung past the collective timeout, or cannot be reached."""
