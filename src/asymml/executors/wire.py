"""The asymml wire protocol: framing, the data-only codec and a deadline-bounded transport (plain or TLS).

Wire format of one message (both directions)::

    b"AML1" | u32 header length | u64 payload length | header (UTF-8 JSON) | payload (tensor bytes)

The header is ``{"msg": ..., "tensors": [{"dtype", "shape", "offset", "nbytes"[, "layout"]}, ...]}`` (``layout``
``"nhwc"``: a 4-D tensor's bytes in channels-last order, delivered as the channels-last tensor it was, so a
remote accelerator computes on the layout a local one gets, and no transposing copy is made); inside ``msg`` a
tensor is ``{"$t": index}``, a tuple ``{"$tuple": [...]}`` and a dtype ``{"$dtype": name}``. Nothing is ever
unpickled. Reading is hostile-peer safe: headers are small and their JSON complexity is bounded before
parsing, payload buffers grow only as bytes actually arrive (never zero-filled to a claimed size), and every
wait is bounded by an overall *deadline* (not a per-``recv`` timeout, which a peer dripping one byte at a time
would reset forever).

:class:`Transport` wraps a connected socket, optionally with TLS done in memory (``ssl.MemoryBIO``): the socket
stays blocking and unshared timeouts are never set on it, so one thread may send while another receives
(``ssl.SSLSocket`` does not allow that safely), and receive waits use ``poll`` with the caller's deadline.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import ProtocolError

PROTOCOL_VERSION = 2
MAGIC = b"AML1"
PREFIX = struct.Struct("!4sIQ")
#: the largest JSON header either side accepts (programs and descriptors are small; tensors go in the payload)
MAX_HEADER_BYTES = 1 << 20
#: the most JSON objects/arrays a header may contain (bounds the parser's memory, ~100 B each)
MAX_HEADER_CONTAINERS = 1 << 16
#: the most tensors in one message
MAX_TENSORS = 1 << 14
DEFAULT_MAX_PAYLOAD_BYTES = 16 << 30
ALIGN = 64
_POLL_SLICE = 0.5

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {v: torch.empty((), dtype=v).element_size() for v in DTYPES.values()}

#: operations the client sends without waiting for an answer (the server only answers them on error)
ONE_WAY = frozenset({"release", "discard", "free", "drop_weights", "reset_stats", "set_profiling", "bye"})

Deadline = Callable[[], float | None]


def _no_deadline() -> float | None:
    return None


# ---------------------------------------------------------------------------------------------- transport
class Transport:
    """A connected stream socket, plain or with TLS in memory; safe for one sender and one receiver thread.

    ``recv_into`` waits at most until ``deadline()`` (``time.monotonic()`` seconds; ``None`` = no limit),
    re-evaluated every half second, and raises :class:`TimeoutError` after it; ``alive()`` returning False
    makes it raise :class:`ConnectionError` (used when closing)."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject | None = None,
                 bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None = None) -> None:
        sock.settimeout(None)
        self.sock = sock
        self.tls = tls
        self._in, self._out = bios if bios is not None else (None, None)
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN | select.POLLPRI)

    # ---------------------------------------------------------- construction
    @classmethod
    def wrap(cls, sock: socket.socket, context: ssl.SSLContext | None, *, server_side: bool,
             server_hostname: str | None = None, deadline: float | None = None) -> Transport:
        """A transport over ``sock``; with ``context``, run the TLS handshake first (bounded by ``deadline``)."""
        if context is None:
            return cls(sock)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
        t = cls(sock, obj, (incoming, outgoing))
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                t._flush()
                t._fill(lambda: deadline, lambda: True)
            except ssl.SSLError:
                try:  # tell the peer why (alert), then fail
                    t._flush()
                except OSError:
                    pass
                raise
        t._flush()
        return t

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        return None if self.tls is None else self.tls.getpeercert()

    # ---------------------------------------------------------- low level
    def _wait(self, deadline: Deadline, alive: Callable[[], bool]) -> None:
        while True:
            if not alive():
                raise ConnectionError("connection closed")
            d = deadline()
            wait = _POLL_SLICE
            if d is not None:
                left = d - time.monotonic()
                if left <= 0:
                    raise TimeoutError("deadline passed while waiting for the peer")
                wait = min(wait, left)
            if self._poll.poll(int(wait * 1000) + 1):
                return

    def _flush(self) -> None:
        """Send what TLS has produced (records, alerts)."""
        assert self._out is not None
        with self._send_lock:
            with self._tls_lock:
                data = self._out.read()
            if data:
                self.sock.sendall(data)

    def _fill(self, deadline: Deadline, alive: Callable[[], bool]) -> None:
        """Feed raw bytes from the socket into TLS (waiting at most until the deadline)."""
        assert self._in is not None
        self._wait(deadline, alive)
        data = self.sock.recv(1 << 20)
        with self._tls_lock:
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()

    # ---------------------------------------------------------- API
    def sendall(self, data: bytes | memoryview) -> None:
        if self.tls is None:
            with self._send_lock:
                self.sock.sendall(data)
            return
        mv = memoryview(data).cast("B")
        for i in range(0, max(len(mv), 1), 1 << 20):
            with self._send_lock:
                with self._tls_lock:
                    self.tls.write(mv[i:i + (1 << 20)])
                    out = self._out.read()
                self.sock.sendall(out)

    def recv_into(self, view: memoryview, deadline: Deadline = _no_deadline,
                  alive: Callable[[], bool] = lambda: True) -> int:
        """Receive up to ``len(view)`` bytes (at least one); 0 at end of stream."""
        if self.tls is None:
            self._wait(deadline, alive)
            return self.sock.recv_into(view, len(view))
        while True:
            with self._tls_lock:
                try:
                    return self.tls.read(len(view), view)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return 0
                except ssl.SSLEOFError:
                    return 0
                finally:
                    pending_out = self._out.pending
            if pending_out and self._send_lock.acquire(blocking=False):
                try:
                    with self._tls_lock:
                        out = self._out.read()
                    self.sock.sendall(out)
                finally:
                    self._send_lock.release()
            self._fill(deadline, alive)

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        try:
            self._poll.unregister(self.sock.fileno())
        except (KeyError, ValueError, OSError, RuntimeError):
            pass
        self.sock.close()


def recv_exact(t: Transport, n: int, deadline: Deadline = _no_deadline,
               alive: Callable[[], bool] = lambda: True) -> bytearray:
    """Exactly ``n`` bytes. The buffer grows as data arrives (at most twice what was received plus 1 MiB),
    so a peer that claims a large size and sends nothing costs nothing."""
    buf = bytearray()
    while len(buf) < n:
        start = len(buf)
        step = min(n - start, max(1 << 20, start))
        buf.extend(bytes(step))
        got = 0
        with memoryview(buf) as mv:
            view = mv[start:]
            while got < step:
                k = t.recv_into(view[got:], deadline, alive)
                if k == 0:
                    raise ConnectionError("connection closed by peer")
                got += k
            view.release()
    return buf


def read_prefix(t: Transport, deadline: Deadline = _no_deadline, alive: Callable[[], bool] = lambda: True,
                *, first_byte_deadline: Deadline | None = None, max_header: int = MAX_HEADER_BYTES) -> tuple[int, int]:
    """Read and check a frame prefix; returns (header length, payload length). ``first_byte_deadline`` bounds
    the wait for the frame to start (idle time), ``deadline`` the rest."""
    first = recv_exact(t, 1, first_byte_deadline or deadline, alive)
    rest = recv_exact(t, PREFIX.size - 1, deadline, alive)
    magic, hlen, plen = PREFIX.unpack(bytes(first + rest))
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r} (expected {MAGIC!r}): not an asymml client/server")
    if hlen > max_header:
        raise ProtocolError(f"header of {hlen} bytes exceeds the limit of {max_header}")
    return hlen, plen


def parse_header(header: bytes) -> dict[str, Any]:
    """Parse a frame header after bounding its complexity. Raises :class:`ProtocolError`."""
    if header.count(b"{") + header.count(b"[") > MAX_HEADER_CONTAINERS:
        raise ProtocolError(f"message header has more than {MAX_HEADER_CONTAINERS} objects/arrays")
    try:
        doc = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"message header is not valid UTF-8 JSON: {e}") from None
    except RecursionError:
        raise ProtocolError("message header nested too deeply") from None
    if not isinstance(doc, dict) or set(doc) != {"msg", "tensors"} or not isinstance(doc["tensors"], list):
        raise ProtocolError("message header must be an object with exactly 'msg' and 'tensors'")
    if len(doc["tensors"]) > MAX_TENSORS:
        raise ProtocolError(f"more than {MAX_TENSORS} tensors in one message")
    if not isinstance(doc["msg"], dict):
        raise ProtocolError("message body must be an object")
    return doc


def read_frame(sock: socket.socket | Transport, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES, *,
               deadline: Deadline = _no_deadline, max_header: int = MAX_HEADER_BYTES) -> tuple[bytes, bytearray]:
    """Read one whole frame; returns (header bytes, payload). Raises :class:`ProtocolError` when framing is
    broken (the stream cannot be resynchronized), ``ConnectionError`` at end of stream and
    :class:`TimeoutError` after ``deadline``."""
    t = sock if isinstance(sock, Transport) else Transport(sock)
    hlen, plen = read_prefix(t, deadline, max_header=max_header)
    if plen > max_payload:
        raise ProtocolError(f"payload of {plen} bytes exceeds the limit of {max_payload}")
    header = bytes(recv_exact(t, hlen, deadline))
    payload = recv_exact(t, plen, deadline) if plen else bytearray()
    return header, payload


# ---------------------------------------------------------------------------------------------- encoding
def _encode_value(obj: Any, tensors: list[Tensor]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Tensor):
        tensors.append(obj)
        return {"$t": len(tensors) - 1}
    if isinstance(obj, tuple):  # includes torch.Size
        return {"$tuple": [_encode_value(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode_value(v, tensors) for v in obj]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str) or k.startswith("$"):
                raise TypeError(f"cannot send dict key {k!r} (keys must be strings not starting with '$')")
            out[k] = _encode_value(v, tensors)
        return out
    if isinstance(obj, torch.dtype):
        if obj not in DTYPE_NAMES:
            raise TypeError(f"cannot send dtype {obj}")
        return {"$dtype": DTYPE_NAMES[obj]}
    raise TypeError(f"cannot send a {type(obj).__name__} to the accelerator (only data: tensors, numbers, strings)")


def _channels_last(t: Tensor) -> bool:
    """A 4-D tensor laid out channels-last and not also NCHW-contiguous (then its layout is worth keeping)."""
    return (t.dim() == 4 and t.numel() > 0 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def _tensor_bytes(t: Tensor, copy: bool) -> tuple[Tensor, memoryview, bool]:
    """The tensor as sent (CPU; a snapshot when ``copy``), its bytes, and whether they are in NHWC order."""
    t = t.detach()
    if t.dtype not in DTYPE_NAMES:
        raise TypeError(f"cannot send a tensor of dtype {t.dtype}")
    t = t.cpu()
    if _channels_last(t):
        nhwc = t.permute(0, 2, 3, 1)  # contiguous: its bytes are the tensor's own, in channels-last order
        if copy:
            nhwc = nhwc.clone()
        return nhwc.permute(0, 3, 1, 2), memoryview(nhwc.reshape(-1).view(torch.uint8).numpy()).cast("B"), True
    t = t.to("cpu", copy=True).contiguous() if copy else t.contiguous()
    if t.numel() == 0:
        return t, memoryview(b""), False
    return t, memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"), False


class _Keep:
    """Keeps tensors alive alongside the buffers that view them (skipped when sending; see :func:`sent_tensors`)."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = tensors


def encode_message(msg: dict[str, Any], *, copy: bool = True) -> list[Any]:
    """Serialize ``msg`` into the buffers of one frame. ``copy`` snapshots tensors (safe to send later)."""
    tensors: list[Tensor] = []
    body = _encode_value(msg, tensors)
    descs, bufs, keep = [], [], []
    offset = 0
    for t in tensors:
        held, mv, nhwc = _tensor_bytes(t, copy)
        keep.append(held)
        pad = (-offset) % ALIGN
        if pad:
            bufs.append(bytes(pad))
            offset += pad
        desc = {"dtype": DTYPE_NAMES[held.dtype], "shape": list(held.shape), "offset": offset, "nbytes": mv.nbytes}
        if nhwc:
            desc["layout"] = "nhwc"
        descs.append(desc)
        if mv.nbytes:
            bufs.append(mv)
        offset += mv.nbytes
    header = json.dumps({"msg": body, "tensors": descs}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"message header too large ({len(header)} bytes)")
    # ``keep`` must outlive the memoryviews: they point into these tensors' storage
    return [PREFIX.pack(MAGIC, len(header), offset) + header, *bufs, _Keep(keep)]


def sent_tensors(bufs: list[Any]) -> list[Tensor]:
    """The (CPU; contiguous or channels-last) tensors an encoded frame sends, in message order: with
    ``copy=True`` these are snapshots, safe to keep even if the caller later changes its own tensors."""
    for b in reversed(bufs):
        if isinstance(b, _Keep):
            return b.tensors
    return []


def payload_size(descs: Iterable[tuple[tuple[int, ...], torch.dtype]]) -> int:
    """The payload bytes of a message carrying tensors of these (shape, dtype), alignment included."""
    offset = 0
    for shape, dtype in descs:
        offset += (-offset) % ALIGN
        n = ITEMSIZE.get(dtype, 8)
        for s in shape:
            n *= s
        offset += n
    return offset


def send_buffers(sock: socket.socket | Transport, bufs: Iterable[Any]) -> None:
    """Send one encoded frame; small pieces are coalesced into one write."""
    send = sock.sendall
    small: list[bytes | memoryview] = []
    for b in bufs:
        if isinstance(b, _Keep):
            continue
        n = len(b) if isinstance(b, bytes) else b.nbytes
        if n < 65536:
            small.append(b)
            continue
        if small:
            send(b"".join(small))
            small = []
        send(b)
    if small:
        send(b"".join(small))


def _decode_tensor(desc: Any, payload: bytearray) -> Tensor:
    if not isinstance(desc, dict) or set(desc) - {"layout"} != {"dtype", "shape", "offset", "nbytes"}:
        raise ProtocolError(f"bad tensor descriptor {str(desc)[:200]}")
    nhwc = "layout" in desc
    if nhwc and (desc["layout"] != "nhwc" or not isinstance(desc["shape"], list) or len(desc["shape"]) != 4):
        raise ProtocolError(f"bad tensor layout {str(desc['layout'])[:50]!r} (only 'nhwc', for a 4-D tensor)")
    dtype = DTYPES.get(desc["dtype"]) if isinstance(desc["dtype"], str) else None
    shape, offset, nbytes = desc["shape"], desc["offset"], desc["nbytes"]
    if dtype is None:
        raise ProtocolError(f"unsupported tensor dtype {str(desc['dtype'])[:50]!r}")
    if not isinstance(shape, list) or len(shape) > 16 or not all(type(s) is int and 0 <= s < 1 << 40 for s in shape):
        raise ProtocolError(f"bad tensor shape {str(shape)[:200]}")
    if type(offset) is not int or type(nbytes) is not int or offset < 0 or nbytes < 0 or offset + nbytes > len(payload):
        raise ProtocolError(f"tensor bytes [{offset}, {offset}+{nbytes}) outside the payload of {len(payload)} bytes")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = ITEMSIZE[dtype]
    if numel * itemsize != nbytes:
        raise ProtocolError(f"tensor of shape {shape} and dtype {desc['dtype']} needs {numel * itemsize} bytes, got {nbytes}")
    if offset % itemsize:
        raise ProtocolError(f"misaligned tensor offset {offset}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(payload, dtype=dtype, count=numel, offset=offset)
    if nhwc:
        B, C, H, W = shape
        return flat.reshape(B, H, W, C).permute(0, 3, 1, 2)
    return flat.reshape(shape)


def _decode_value(obj: Any, tensors: list[Tensor], depth: int = 0) -> Any:
    if depth > 64:
        raise ProtocolError("message nested too deeply")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_decode_value(v, tensors, depth + 1) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (k, v), = obj.items()
            if k == "$t":
                if type(v) is not int or not 0 <= v < len(tensors):
                    raise ProtocolError(f"bad tensor reference {str(v)[:50]}")
                return tensors[v]
            if k == "$tuple":
                if not isinstance(v, list):
                    raise ProtocolError("bad tuple encoding")
                return tuple(_decode_value(x, tensors, depth + 1) for x in v)
            if k == "$dtype":
                if v not in DTYPES:
                    raise ProtocolError(f"unsupported dtype {str(v)[:50]!r}")
                return DTYPES[v]
        out = {}
        for k, v in obj.items():
            if k.startswith("$"):
                raise ProtocolError(f"unknown tagged value {k[:50]!r}")
            out[k] = _decode_value(v, tensors, depth + 1)
        return out
    raise ProtocolError(f"unexpected JSON value of type {type(obj).__name__}")


def decode_body(doc: dict[str, Any], payload: bytearray) -> dict[str, Any]:
    """The message of a parsed header (see :func:`parse_header`); tensors share ``payload``'s memory."""
    tensors = [_decode_tensor(d, payload) for d in doc["tensors"]]
    return _decode_value(doc["msg"], tensors)


def decode_message(header: bytes, payload: bytearray) -> dict[str, Any]:
    """Turn a frame back into a message dict (tensors share ``payload``'s memory). Raises :class:`ProtocolError`."""
    return decode_body(parse_header(header), payload)


def encode_program(program: list[Any]) -> list[dict[str, Any]]:
    """A program as plain data."""
    return [{"out": i.out, "op": i.op, "args": list(i.args), "params": list(i.params), "kw": dict(i.kw)} for i in program]


def decode_program(data: Any) -> list[Any]:
    """Validate and rebuild a program sent as data (only ops of the accelerator's instruction set, each with
    its own keyword names and small plain values; see :func:`asymml.executors.ops.check_program`)."""
    from .ops import Instr, check_program

    if not isinstance(data, list):
        raise ProtocolError("program must be a list of instructions")
    prog = []
    for d in data:
        if not isinstance(d, dict) or set(d) != {"out", "op", "args", "params", "kw"}:
            raise ProtocolError(f"bad instruction {str(d)[:200]}")
        if not isinstance(d["out"], str) or not isinstance(d["op"], str):
            raise ProtocolError("instruction out/op must be strings")
        for f in ("args", "params"):
            if not isinstance(d[f], list) or not all(isinstance(a, str) for a in d[f]):
                raise ProtocolError(f"instruction {d['out'][:50]!r}: {f} must be a list of names")
        if not isinstance(d["kw"], dict):
            raise ProtocolError(f"instruction {d['out'][:50]!r}: kw must be an object")
        prog.append(Instr(d["out"], d["op"], tuple(d["args"]), tuple(d["params"]), d["kw"]))
    check_program(prog)
    return prog
