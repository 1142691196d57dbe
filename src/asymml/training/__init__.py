"""Training and evaluation behind ``asymml train`` / ``asymml eval``: configuration, loop, checkpoints,
reports (TensorBoard, learning curves, JSON summary)."""

from .builders import build_model, build_split
from .checkpoint import atomic_save, load_checkpoint
from .config import OPTIONS, TrainConfig, load_config_file
from .evaluation import evaluate
from .run import prepare, train
from .trainer import Trainer, TrainResult

__all__ = [
    "OPTIONS",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "atomic_save",
    "build_model",
    "build_split",
    "evaluate",
    "load_checkpoint",
    "load_config_file",
    "prepare",
    "train",
]
