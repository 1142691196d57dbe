"""Shared pieces of the hostile-peer tests: a tiny model, in-process servers and a scriptable fake server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asymml.executors.server import AcceleratorServer
from asymml.executors.wire import PROTOCOL_VERSION, decode_message, encode_message, read_frame, send_buffers


class Tiny(nn.Module):
    """conv-BN-ReLU, conv-BN + skip, global pool, linear: every kind of accelerator job, in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)) + y)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def batch(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def serving(server: AcceleratorServer) -> Iterator[AcceleratorServer]:
    """Run ``server`` in a thread for the duration of the block."""
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        t.join(timeout=10)


class FakeServer:
    """A loopback 'accelerator' that answers the handshake and then runs ``script(sock, first_request)``."""

    def __init__(self, script: Callable[[socket.socket, dict[str, Any]], None]) -> None:
        self.script = script
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.address = f"tcp://127.0.0.1:{self.lsock.getsockname()[1]}"
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.lsock.accept()
            with conn:
                while True:
                    msg = decode_message(*read_frame(conn))
                    if msg["op"] == "hello":
                        reply(conn, {"id": msg["id"], "ok": True,
                                     "result": {"device": "cpu", "protocol": PROTOCOL_VERSION}})
                    elif msg["op"] not in ("release", "discard", "free", "reset_stats", "set_profiling"):
                        self.script(conn, msg)
                        time.sleep(30)  # hold the connection: the client must give up by itself
                        return
        except (OSError, ConnectionError):
            pass
        except BaseException as e:  # pragma: no cover - reported by the test
            self.errors.append(e)

    def close(self) -> None:
        self.lsock.close()


def reply(sock: socket.socket, msg: dict[str, Any]) -> None:
    send_buffers(sock, encode_message(msg))


def split_all(model: nn.Module, **kw: Any) -> Any:
    """``asymml.split`` with every splittable layer on the accelerator (no cost-model placement), so each
    test exercises accelerator jobs whatever the machine."""
    import inspect

    import asymml

    if "placement" in inspect.signature(asymml.split).parameters:
        kw.setdefault("placement", "split")
    return asymml.split(model, **kw)
