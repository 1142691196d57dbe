"""Compatibility re-exports: the training loop now lives in one module per job (``builders``, ``batches``,
``evaluation``, ``signals``, ``dp``, ``trainer``, ``summary``)."""

from .batches import Batches
from .builders import build_model, build_split, default_out_dir, lr_factor, noise_config
from .evaluation import diverged_guard, evaluate
from .signals import StopRequests
from .trainer import Callback, Trainer, TrainResult

__all__ = ["Batches", "Callback", "StopRequests", "TrainResult", "Trainer", "build_model", "build_split",
           "default_out_dir", "diverged_guard", "evaluate", "lr_factor", "noise_config"]
