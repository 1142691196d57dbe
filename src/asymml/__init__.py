"""asymml: train and run CNNs with a trusted low-rank part and an untrusted accelerator residual part."""

from ._env import tune_process_environment

tune_process_environment()  # before torch is imported where possible (OpenMP reads its settings at load)

from .api import split, split_with_options
from .decomposition import AdaptiveRank, FixedRank, RankList, RankSchedule, decompose, parse_rank
from .errors import (
    AcceleratorConnectionError,
    AsymmlError,
    CheckpointError,
    ConfigError,
    DatasetNotFoundError,
    InputError,
    IntegrityError,
    PrivacyConfigError,
    ProtocolError,
    RemoteError,
    TrainingDivergedError,
    UnsupportedOperationError,
    UntraceableModelError,
)
from .executors import Executor, LocalExecutor, RemoteExecutor
from .ledger import Ledger, Release
from .microbatch import Accumulated, accumulate
from .options import SplitOptions
from .runtime import SplitModule
from .validate import ValidationReport, fix, validate

__version__ = "0.1.0"

__all__ = [
    "split", "split_with_options", "SplitOptions", "SplitModule",
    "Executor", "LocalExecutor", "RemoteExecutor", "Ledger", "Release", "validate", "fix",
    "ValidationReport", "decompose", "parse_rank", "FixedRank", "RankList", "RankSchedule", "AdaptiveRank",
    "AsymmlError", "ConfigError", "InputError", "UnsupportedOperationError", "UntraceableModelError",
    "CheckpointError", "IntegrityError", "PrivacyConfigError", "DatasetNotFoundError", "TrainingDivergedError",
    "ProtocolError", "RemoteError", "AcceleratorConnectionError", "accumulate", "Accumulated",
]
