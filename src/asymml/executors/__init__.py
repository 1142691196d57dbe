"""Executors: the accelerator behind one interface (in-process or a remote server)."""

from .base import BackwardRequest, Executor, Handle
from .local import LocalExecutor

__all__ = ["Executor", "LocalExecutor", "Handle", "BackwardRequest"]
