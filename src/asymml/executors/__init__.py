"""Executors: the accelerator behind one interface (in-process or a remote server)."""

from .base import BackwardRequest, Executor, Handle
from .local import LocalExecutor
from .remote import RemoteExecutor, make_executor
from .tls import TLSConfig
from .verify import Verifier

__all__ = ["Executor", "LocalExecutor", "RemoteExecutor", "make_executor", "Handle", "BackwardRequest", "TLSConfig",
           "Verifier"]
