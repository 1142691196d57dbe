"""Accelerator addresses (``tcp://host:port``, ``unix:///path``): parsing, loopback test and connecting."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from ..errors import AcceleratorConnectionError, ConfigError


@dataclass(frozen=True)
class Address:
    """A parsed ``tcp://host:port`` or ``unix:///path`` address."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def is_local(self) -> bool:
        """True for Unix sockets and TCP on a loopback address (traffic never leaves the host)."""
        return self.scheme == "unix" or is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``); names are not resolved otherwise."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def is_address(spec: object) -> bool:
    """Whether ``spec`` names a remote accelerator (``tcp://…`` or ``unix://…``) rather than a local device."""
    return isinstance(spec, str) and (spec.startswith("tcp://") or spec.startswith("unix://"))


def parse_address(address: str) -> Address:
    """Parse ``tcp://host:port`` (``[v6addr]`` allowed) or ``unix:///absolute/or/relative/path``."""
    if not isinstance(address, str):
        raise ConfigError(f"accelerator address must be a string, got {type(address).__name__}")
    if address.startswith("unix://"):
        path = address[len("unix://"):]
        if not path:
            raise ConfigError(f"invalid address {address!r}: empty socket path (use unix:///tmp/asymml.sock)")
        return Address("unix", path=path)
    if address.startswith("tcp://"):
        rest = address[len("tcp://"):].rstrip("/")
        if rest.startswith("["):
            host, sep, port_s = rest[1:].partition("]:")
        else:
            host, sep, port_s = rest.rpartition(":")
        if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
            raise ConfigError(f"invalid address {address!r}: expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:7777)")
        return Address("tcp", host=host, port=int(port_s))
    raise ConfigError(f"invalid accelerator address {address!r}: use tcp://HOST:PORT or unix:///PATH")


def tune(sock: socket.socket) -> None:
    """Low latency (no Nagle) and large buffers for tensor traffic."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:  # pragma: no cover - capped by the OS
            pass


def connect(address: str | Address, timeout: float | None = 10.0) -> socket.socket:
    """Open a connected, tuned (blocking) socket to ``address``; ``timeout`` bounds the connect."""
    addr = parse_address(address) if isinstance(address, str) else address
    try:
        if addr.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(addr.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
    except OSError as e:
        raise AcceleratorConnectionError(
            f"cannot connect to the accelerator server at {addr}: {e.strerror or e} "
            f"(is `asymml serve --listen {addr}` running?)"
        ) from None
    sock.settimeout(None)
    tune(sock)
    return sock
