"""A remote accelerator: the :class:`~asymml.executors.base.Executor` interface over a socket (level 2).

The trusted program (inside an SGX enclave at level 2, or any process) talks to an accelerator server
(:mod:`asymml.executors.server`, ``asymml serve``) over TCP (``tcp://host:port``) or a Unix-domain socket
(``unix:///path``). Everything crosses *by value* and as data only:

* tensors as raw bytes with a ``dtype`` / ``shape`` header (never pickle);
* programs (:class:`~asymml.executors.ops.Instr` lists) and every other field as JSON.

Wire format of one message (both directions)::

    b"AML1" | u32 header length | u64 payload length | header (UTF-8 JSON) | payload (tensor bytes)

The header is ``{"msg": ..., "tensors": [{"dtype", "shape", "offset", "nbytes"}, ...]}``; inside ``msg`` a
tensor is ``{"$t": index}``, a tuple ``{"$tuple": [...]}`` and a dtype ``{"$dtype": name}``. Requests carry an
``id``; the server answers ``{"id", "ok": true, "result"}`` or ``{"id", "ok": false, "error", "type"}``.
``release``, ``discard``, ``free`` and the like are not answered unless they fail.

The client ledger records exactly what :class:`~asymml.executors.local.LocalExecutor` records: every
release, and a weight whenever its value (tensor identity, version, shape) changed since it was last sent.
Weights are cached on the server under a client-chosen id, so unchanged weights are not resent.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import queue
import select
import socket
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import AcceleratorConnectionError, ConfigError, ProtocolError, RemoteError
from ..ledger import Ledger
from .base import BackwardRequest, Executor, Handle
from .ops import Instr

log = logging.getLogger("asymml.remote")

PROTOCOL_VERSION = 1
MAGIC = b"AML1"
_PREFIX = struct.Struct("!4sIQ")
MAX_HEADER_BYTES = 64 << 20
DEFAULT_MAX_PAYLOAD_BYTES = 16 << 30
_ALIGN = 64

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {v: torch.empty((), dtype=v).element_size() for v in DTYPES.values()}

# operations the client sends without waiting for an answer (the server only answers them on error)
ONE_WAY = frozenset({"release", "discard", "free", "drop_weights", "reset_stats", "set_profiling", "bye"})


# ---------------------------------------------------------------------------------------------- addresses
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


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:  # pragma: no cover - capped by the OS
            pass


def connect(address: str | Address, timeout: float | None = 10.0) -> socket.socket:
    """Open a connected, tuned socket to ``address``."""
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
    _tune(sock)
    return sock


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
        if obj not in _DTYPE_NAMES:
            raise TypeError(f"cannot send dtype {obj}")
        return {"$dtype": _DTYPE_NAMES[obj]}
    raise TypeError(f"cannot send a {type(obj).__name__} to the accelerator (only data: tensors, numbers, strings)")


def _tensor_bytes(t: Tensor, copy: bool) -> tuple[Tensor, memoryview]:
    t = t.detach()
    if t.dtype not in _DTYPE_NAMES:
        raise TypeError(f"cannot send a tensor of dtype {t.dtype}")
    t = t.to("cpu", copy=True).contiguous() if copy else t.cpu().contiguous()
    if t.numel() == 0:
        return t, memoryview(b"")
    return t, memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def encode_message(msg: dict[str, Any], *, copy: bool = True) -> list[bytes | memoryview]:
    """Serialize ``msg`` into the buffers of one frame. ``copy`` snapshots tensors (safe to send later)."""
    tensors: list[Tensor] = []
    body = _encode_value(msg, tensors)
    descs, bufs, keep = [], [], []
    offset = 0
    for t in tensors:
        held, mv = _tensor_bytes(t, copy)
        keep.append(held)
        pad = (-offset) % _ALIGN
        if pad:
            bufs.append(bytes(pad))
            offset += pad
        descs.append({"dtype": _DTYPE_NAMES[held.dtype], "shape": list(held.shape), "offset": offset, "nbytes": mv.nbytes})
        if mv.nbytes:
            bufs.append(mv)
        offset += mv.nbytes
    header = json.dumps({"msg": body, "tensors": descs}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"message header too large ({len(header)} bytes)")
    # ``keep`` must outlive the memoryviews: they point into these tensors' storage
    return [_PREFIX.pack(MAGIC, len(header), offset) + header, *bufs, _Keep(keep)]


class _Keep:
    """Keeps tensors alive alongside the buffers that view them (skipped when sending)."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = tensors


def send_buffers(sock: socket.socket, bufs: Iterable[Any]) -> None:
    """Send one encoded frame; small pieces are coalesced into one write."""
    small: list[bytes | memoryview] = []
    size = 0
    for b in bufs:
        if isinstance(b, _Keep):
            continue
        n = len(b) if isinstance(b, bytes) else b.nbytes
        if n < 65536:
            small.append(b)
            size += n
            continue
        if small:
            sock.sendall(b"".join(small))
            small, size = [], 0
        sock.sendall(b)
    if small:
        sock.sendall(b"".join(small))


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by peer")
        got += k
    return buf


def read_frame(sock: socket.socket, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES) -> tuple[bytes, bytearray]:
    """Read one frame; returns (header bytes, payload). Raises :class:`ProtocolError` when framing is broken
    (the stream cannot be resynchronized) and ``ConnectionError`` at end of stream."""
    magic, hlen, plen = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r} (expected {MAGIC!r}): not an asymml client/server")
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {hlen} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    if plen > max_payload:
        raise ProtocolError(f"payload of {plen} bytes exceeds the limit of {max_payload}")
    header = bytes(_recv_exact(sock, hlen))
    payload = _recv_exact(sock, plen) if plen else bytearray()
    return header, payload


def _decode_tensor(desc: Any, payload: bytearray) -> Tensor:
    if not isinstance(desc, dict) or set(desc) != {"dtype", "shape", "offset", "nbytes"}:
        raise ProtocolError(f"bad tensor descriptor {desc!r}")
    dtype = DTYPES.get(desc["dtype"]) if isinstance(desc["dtype"], str) else None
    shape, offset, nbytes = desc["shape"], desc["offset"], desc["nbytes"]
    if dtype is None:
        raise ProtocolError(f"unsupported tensor dtype {desc['dtype']!r}")
    if not isinstance(shape, list) or len(shape) > 16 or not all(type(s) is int and s >= 0 for s in shape):
        raise ProtocolError(f"bad tensor shape {shape!r}")
    if type(offset) is not int or type(nbytes) is not int or offset < 0 or offset + nbytes > len(payload):
        raise ProtocolError(f"tensor bytes [{offset}, {offset}+{nbytes}) outside the payload of {len(payload)} bytes")
    numel = 1
    for s in shape:
        numel *= s
    itemsize = _ITEMSIZE[dtype]
    if numel * itemsize != nbytes:
        raise ProtocolError(f"tensor of shape {shape} and dtype {desc['dtype']} needs {numel * itemsize} bytes, got {nbytes}")
    if offset % itemsize:
        raise ProtocolError(f"misaligned tensor offset {offset}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(payload, dtype=dtype, count=numel, offset=offset).reshape(shape)


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
                    raise ProtocolError(f"bad tensor reference {v!r}")
                return tensors[v]
            if k == "$tuple":
                if not isinstance(v, list):
                    raise ProtocolError("bad tuple encoding")
                return tuple(_decode_value(x, tensors, depth + 1) for x in v)
            if k == "$dtype":
                if v not in DTYPES:
                    raise ProtocolError(f"unsupported dtype {v!r}")
                return DTYPES[v]
        out = {}
        for k, v in obj.items():
            if k.startswith("$"):
                raise ProtocolError(f"unknown tagged value {k!r}")
            out[k] = _decode_value(v, tensors, depth + 1)
        return out
    raise ProtocolError(f"unexpected JSON value of type {type(obj).__name__}")


def decode_message(header: bytes, payload: bytearray) -> dict[str, Any]:
    """Turn a frame back into a message dict (tensors share ``payload``'s memory). Raises :class:`ProtocolError`."""
    try:
        doc = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"message header is not valid UTF-8 JSON: {e}") from None
    except RecursionError:
        raise ProtocolError("message header nested too deeply") from None
    if not isinstance(doc, dict) or set(doc) != {"msg", "tensors"} or not isinstance(doc["tensors"], list):
        raise ProtocolError("message header must be an object with exactly 'msg' and 'tensors'")
    tensors = [_decode_tensor(d, payload) for d in doc["tensors"]]
    msg = _decode_value(doc["msg"], tensors)
    if not isinstance(msg, dict):
        raise ProtocolError("message body must be an object")
    return msg


def encode_program(program: list[Instr]) -> list[dict[str, Any]]:
    """A program as plain data."""
    return [{"out": i.out, "op": i.op, "args": list(i.args), "params": list(i.params), "kw": dict(i.kw)} for i in program]


def decode_program(data: Any) -> list[Instr]:
    """Validate and rebuild a program sent as data (only ops of the accelerator's instruction set)."""
    from .ops import OPS

    if not isinstance(data, list):
        raise ProtocolError("program must be a list of instructions")
    prog = []
    for d in data:
        if not isinstance(d, dict) or set(d) != {"out", "op", "args", "params", "kw"}:
            raise ProtocolError(f"bad instruction {d!r}")
        if not isinstance(d["out"], str) or d["op"] not in OPS:
            raise ProtocolError(f"unknown accelerator op {d.get('op')!r} (allowed: {', '.join(sorted(OPS))})")
        for f in ("args", "params"):
            if not isinstance(d[f], list) or not all(isinstance(a, str) for a in d[f]):
                raise ProtocolError(f"instruction {d['out']!r}: {f} must be a list of names")
        if not isinstance(d["kw"], dict):
            raise ProtocolError(f"instruction {d['out']!r}: kw must be an object")
        prog.append(Instr(d["out"], d["op"], tuple(d["args"]), tuple(d["params"]), d["kw"]))
    return prog


# ---------------------------------------------------------------------------------------------- client
class _Weight:
    __slots__ = ("ref", "version", "shape", "dtype", "wid")

    def __init__(self, ref: weakref.ref, version: int, shape: tuple[int, ...], dtype: torch.dtype, wid: int) -> None:
        self.ref, self.version, self.shape, self.dtype, self.wid = ref, version, shape, dtype, wid


def _weight_died(cache: dict[int, _Weight], dead: deque, key: int, wid: int, _ref: Any) -> None:
    e = cache.get(key)
    if e is not None and e.wid == wid:
        del cache[key]
    dead.append(wid)


_STOP = object()


class RemoteExecutor(Executor):
    """An accelerator server reached over ``tcp://host:port`` or ``unix:///path`` (see ``asymml serve``).

    Args:
        address: the server's address.
        audit: keep a snapshot of every release in ``ledger``.
        timeout: seconds to wait for an answer while requests are pending before declaring the server
            dead (``None``: wait forever).
        connect_timeout: seconds for connecting and the handshake.
    """

    def __init__(self, address: str, *, audit: bool = False, timeout: float | None = 300.0,
                 connect_timeout: float = 10.0) -> None:
        self.address = parse_address(address)
        self.ledger = Ledger(audit)
        self.home = torch.device("cpu")
        self.timeout = timeout
        self._closed: BaseException | None = None
        self._async_error: RemoteError | None = None
        self._pending: dict[int, tuple[Future, Callable[[Any], Any]]] = {}
        self._plock = threading.Lock()
        self._req_ids = itertools.count(1)
        self._hids = itertools.count()
        self._wids = itertools.count()
        self._weights: dict[int, _Weight] = {}
        self._dead_wids: deque[int] = deque()
        self._programs: dict[int, tuple[list[Instr], int]] = {}
        self._pids = itertools.count()
        self._outq: queue.SimpleQueue = queue.SimpleQueue()
        self._sock = connect(self.address, connect_timeout)
        self._sock.settimeout(timeout)  # bounds every blocking send/recv; idle waits use select()
        self._reader = threading.Thread(target=self._read_loop, name="asymml-remote-rx", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="asymml-remote-tx", daemon=True)
        self._reader.start()
        self._writer.start()
        try:
            info = self._call({"op": "hello", "version": PROTOCOL_VERSION}).result(timeout=connect_timeout)
        except FutureTimeoutError:
            self.close()
            raise AcceleratorConnectionError(f"accelerator server at {self.address} did not answer the handshake "
                                             f"within {connect_timeout}s") from None
        except BaseException:
            self.close()
            raise
        self.server_info: dict[str, Any] = info
        try:
            self.device = torch.device(info["device"])
        except (KeyError, TypeError, RuntimeError):
            self.close()
            raise AcceleratorConnectionError(f"bad handshake from {self.address}: {info!r}") from None

    # ------------------------------------------------------------------ plumbing
    @property
    def audit(self) -> bool:
        return self.ledger.audit

    @audit.setter
    def audit(self, on: bool) -> None:
        self.ledger.audit = on

    def _check(self) -> None:
        if self._closed is not None:
            raise AcceleratorConnectionError(f"accelerator server at {self.address} is not reachable: {self._closed}")
        err, self._async_error = self._async_error, None
        if err is not None:
            raise err

    def _send(self, msg: dict[str, Any]) -> None:
        self._outq.put(encode_message(msg))

    def _call(self, msg: dict[str, Any], decode: Callable[[Any], Any] = lambda r: r) -> Future:
        fut: Future = Future()
        rid = next(self._req_ids)
        msg["id"] = rid
        bufs = encode_message(msg)
        with self._plock:
            if self._closed is not None:
                raise AcceleratorConnectionError(f"accelerator server at {self.address} is not reachable: {self._closed}")
            self._pending[rid] = (fut, decode)
        self._outq.put(bufs)
        return fut

    def _one_way(self, msg: dict[str, Any]) -> None:
        msg["id"] = next(self._req_ids)
        self._send(msg)

    def _fail(self, exc: BaseException) -> None:
        with self._plock:
            if self._closed is None:
                self._closed = exc
            pending, self._pending = self._pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(AcceleratorConnectionError(f"accelerator server at {self.address}: {exc}"))
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._outq.put(_STOP)

    def _write_loop(self) -> None:
        while True:
            bufs = self._outq.get()
            if bufs is _STOP:
                return
            if self._closed is not None:
                continue
            try:
                send_buffers(self._sock, bufs)
            except OSError as e:
                self._fail(ConnectionError(f"connection lost while sending ({e.strerror or e})"))

    def _wait_readable(self) -> bool:
        """Block until data arrives; False when the server stayed silent for ``timeout`` with requests pending."""
        last = time.monotonic()
        while True:
            if self._closed is not None:
                return True  # the read will fail and end the loop
            r, _, _ = select.select([self._sock], [], [], 1.0)
            if r:
                return True
            with self._plock:
                busy = bool(self._pending)
            if not busy:
                last = time.monotonic()
            elif self.timeout is not None and time.monotonic() - last > self.timeout:
                return False

    def _read_loop(self) -> None:
        while True:
            try:
                if not self._wait_readable():
                    self._fail(TimeoutError(f"no answer within {self.timeout}s (server hung or overloaded)"))
                    return
                header, payload = read_frame(self._sock)
                msg = decode_message(header, payload)
            except (OSError, ValueError) as e:
                if isinstance(e, socket.timeout):
                    e = TimeoutError(f"reply stalled for more than {self.timeout}s")
                elif isinstance(e, OSError):
                    e = ConnectionError(f"connection lost ({e.strerror or e})")
                self._fail(e)
                return
            rid = msg.get("id")
            with self._plock:
                entry = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if entry is None:
                if not msg.get("ok", False):
                    err = RemoteError(f"accelerator server: {msg.get('type', 'Error')}: {msg.get('error')}")
                    log.error("%s", err)
                    if self._async_error is None:
                        self._async_error = err
                continue
            fut, decode = entry
            if msg.get("ok"):
                try:
                    fut.set_result(decode(msg.get("result")))
                except Exception as e:  # a malformed answer
                    fut.set_exception(RemoteError(f"malformed answer from the accelerator server: {e}"))
            else:
                fut.set_exception(RemoteError(f"accelerator server: {msg.get('type', 'Error')}: {msg.get('error')}"))

    # ------------------------------------------------------------------ weights and programs
    def _weights_msg(self, params: dict[str, Tensor], layer: str) -> tuple[dict[str, int], list[list[Any]]]:
        names: dict[str, int] = {}
        new: list[list[Any]] = []
        for name, p in params.items():
            key = id(p)
            e = self._weights.get(key)
            same = e is not None and e.ref() is p
            if not same or e.version != p._version or e.shape != tuple(p.shape) or e.dtype != p.dtype:
                self.ledger.record(f"{layer}.{name}", "weight", p)
                wid = e.wid if same else next(self._wids)
                ref = weakref.ref(p, functools.partial(_weight_died, self._weights, self._dead_wids, key, wid))
                self._weights[key] = _Weight(ref, p._version, tuple(p.shape), p.dtype, wid)
                new.append([wid, p.detach()])
                e = self._weights[key]
            names[name] = e.wid
        return names, new

    def _program_msg(self, program: list[Instr]) -> dict[str, Any]:
        hit = self._programs.get(id(program))
        if hit is not None and hit[0] is program:
            return {"pid": hit[1]}
        pid = next(self._pids)
        self._programs[id(program)] = (program, pid)  # holds the list: programs are immutable plan data
        return {"pid": pid, "instrs": encode_program(program)}

    # ------------------------------------------------------------------ interface
    def release(self, tensor: Tensor, *, layer: str, kind: str) -> Handle:
        self._check()
        self.ledger.record(layer, kind, tensor)
        hid = next(self._hids)
        self._one_way({"op": "release", "hid": hid, "layer": layer, "kind": kind, "tensor": tensor})
        return Handle(hid, tuple(tensor.shape))

    def discard(self, handles: list[Handle]) -> None:
        if handles and self._closed is None:
            self._one_way({"op": "discard", "hids": [h.id for h in handles]})

    def forward(
        self,
        key: int,
        program: list[Instr],
        inputs: dict[str, Handle],
        params: dict[str, Tensor],
        outputs: list[str],
        *,
        layer: str,
        keep_graph: bool,
        grad_params: tuple[str, ...] = (),
    ) -> Future[dict[str, Tensor | None]]:
        self._check()
        names, new = self._weights_msg(params, layer)
        drop = []
        while self._dead_wids:
            drop.append(self._dead_wids.popleft())
        msg = {
            "op": "forward", "key": key, "program": self._program_msg(program),
            "inputs": {n: h.id for n, h in inputs.items()}, "params": names, "weights": new, "drop": drop,
            "outputs": list(outputs), "layer": layer, "keep_graph": bool(keep_graph), "grad_params": list(grad_params),
        }

        def decode(res: Any) -> dict[str, Tensor | None]:
            if not isinstance(res, dict) or not all(v is None or isinstance(v, Tensor) for v in res.values()):
                raise ValueError("forward result must map names to tensors")
            return res

        return self._call(msg, decode)

    def backward(self, key: int, request: BackwardRequest) -> Future[dict[str, dict[str, Tensor | None]]]:
        self._check()
        msg = {
            "op": "backward", "key": key,
            "grad_outputs": {n: (None if h is None else h.id) for n, h in request.grad_outputs.items()},
            "input_grads": list(request.input_grads), "param_grads": list(request.param_grads),
            "value_grads": list(request.value_grads), "values": list(request.values),
        }

        def decode(res: Any) -> dict[str, dict[str, Tensor | None]]:
            sections = ("input_grads", "param_grads", "value_grads", "values")
            if not isinstance(res, dict) or set(res) != set(sections):
                raise ValueError("backward result must have input_grads/param_grads/value_grads/values")
            for s in sections:
                if not isinstance(res[s], dict) or not all(v is None or isinstance(v, Tensor) for v in res[s].values()):
                    raise ValueError(f"backward result section {s} must map names to tensors")
            return res

        return self._call(msg, decode)

    def free(self, key: int) -> None:
        if self._closed is None:
            self._one_way({"op": "free", "key": key})

    def run_module(self, module: torch.nn.Module, inputs: tuple[Any, ...], *, layer: str = "model") -> Any:
        raise NotImplementedError(
            "RemoteExecutor cannot run whole modules: mode='plain' would ship the model code and the raw inputs "
            "to the accelerator server. Use mode 'asym' or 'noise-only' remotely, or a LocalExecutor for the "
            "plain baseline."
        )

    def stats(self) -> dict[str, dict[str, float]]:
        self._check()
        return self._call({"op": "stats"}).result()

    def reset_stats(self) -> None:
        self._check()
        self._one_way({"op": "reset_stats"})

    def set_profiling(self, on: bool) -> None:
        self._check()
        self._one_way({"op": "set_profiling", "on": bool(on)})

    def synchronize(self) -> None:
        """Wait until the server has finished every submitted job."""
        self._check()
        self._call({"op": "sync"}).result()

    def close(self) -> None:
        """Say goodbye and close the connection (idempotent)."""
        if self._closed is None and self._writer.is_alive():
            self._one_way({"op": "bye"})
            self._outq.put(_STOP)
            self._writer.join(timeout=5.0)
        with self._plock:
            if self._closed is None:
                self._closed = ConnectionError("the executor was closed")
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._outq.put(_STOP)
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=5.0)

    def __enter__(self) -> RemoteExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteExecutor({str(self.address)!r})"


def make_executor(spec: str | torch.device, *, audit: bool = False) -> Executor:
    """An executor from a device-or-address string: ``tcp://…`` / ``unix://…`` give a :class:`RemoteExecutor`,
    anything else (``cpu``, ``cuda:1``, ``auto``) a :class:`~asymml.executors.local.LocalExecutor`."""
    if isinstance(spec, str) and (spec.startswith("tcp://") or spec.startswith("unix://")):
        return RemoteExecutor(spec, audit=audit)
    from .local import LocalExecutor

    return LocalExecutor(spec, audit=audit)
