"""A remote accelerator: the :class:`~asymml.executors.base.Executor` interface over a socket (level 2).

The trusted program (inside an SGX enclave at level 2, or any process) talks to an accelerator server
(:mod:`asymml.executors.server`, ``asymml serve``) over TCP (``tcp://host:port``) or a Unix-domain socket
(``unix:///path``), with mutual TLS (:mod:`asymml.executors.tls`) unless both ends are on this host and the
caller accepts an unauthenticated link. Everything crosses *by value* and as data only (see
:mod:`asymml.executors.wire` for the format). Requests carry an ``id``; the server answers
``{"id", "ok": true, "result"}`` or ``{"id", "ok": false, "error", "type"}``; ``release``, ``discard``,
``free`` and the like are not answered unless they fail.

The server is untrusted: every reply is bounded before it is read (the client knows the shapes it expects,
so a reply may not claim more bytes than those), must arrive before the request's deadline, must answer a
request that is pending (anything else is a protocol error that ends the connection), and, with ``verify``
(the default), is checked by :class:`~asymml.executors.verify.Verifier` before it is handed to the caller.
Any failure of the reader fails every pending request at once.

The client ledger records exactly what :class:`~asymml.executors.local.LocalExecutor` records: every
release, and a weight whenever its value (tensor identity, version, shape) changed since it was last sent.
Weights are cached on the server under a client-chosen id, so unchanged weights are not resent.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import ssl
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import AcceleratorConnectionError, ConfigError, IntegrityError, ProtocolError, RemoteError
from ..ledger import Ledger
from .addresses import Address, connect, is_address, parse_address
from .base import BackwardRequest, Executor, Handle
from .ops import Instr
from .tls import TLSConfig
from .verify import Verifier
from .wire import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_HEADER_BYTES,
    ONE_WAY,
    PROTOCOL_VERSION,
    Transport,
    decode_body,
    decode_message,
    decode_program,
    encode_message,
    encode_program,
    parse_header,
    payload_size,
    read_frame,
    read_prefix,
    recv_exact,
    send_buffers,
    sent_tensors,
)

__all__ = [
    "RemoteExecutor", "make_executor", "Address", "parse_address", "connect", "encode_message", "decode_message",
    "read_frame", "send_buffers", "encode_program", "decode_program", "AcceleratorConnectionError",
    "DEFAULT_MAX_PAYLOAD_BYTES", "MAX_HEADER_BYTES", "ONE_WAY", "PROTOCOL_VERSION", "ProtocolError",
]

log = logging.getLogger("asymml.remote")

#: replies carry results, not programs: their headers are small
MAX_REPLY_HEADER_BYTES = 256 << 10
_ERROR_REPLY_BYTES = 1 << 16
_SLACK = 4096


class _Weight:
    __slots__ = ("ref", "version", "shape", "dtype", "wid")

    def __init__(self, ref: weakref.ref, version: int, shape: tuple[int, ...], dtype: torch.dtype, wid: int) -> None:
        self.ref, self.version, self.shape, self.dtype, self.wid = ref, version, shape, dtype, wid


def _weight_died(cache: dict[int, _Weight], dead: deque, key: int, wid: int, _ref: Any) -> None:
    e = cache.get(key)
    if e is not None and e.wid == wid:
        del cache[key]
    dead.append(wid)


@dataclass
class _Pending:
    fut: Future
    decode: Callable[[Any], Any]
    deadline: float | None
    max_payload: int
    op: str


_STOP = object()


class RemoteExecutor(Executor):
    """An accelerator server reached over ``tcp://host:port`` or ``unix:///path`` (see ``asymml serve``).

    Args:
        address: the server's address.
        audit: keep a snapshot of every release in ``ledger``.
        timeout: overall deadline in seconds for each request, from submission to a complete reply
            (``None``: wait forever). A server that misses it is declared dead and every pending request fails.
        connect_timeout: seconds for connecting, the TLS handshake and the protocol handshake.
        tls_cert, tls_key, tls_ca: this client's certificate and key and the CA that signs the server's
            certificate (mutual TLS; all three or none).
        insecure: allow an unauthenticated, unencrypted link to a non-loopback address (refused otherwise).
        verify: check every result (shape, dtype, finiteness and randomized Freivalds checks); on by default
            because the accelerator is untrusted. A failed check raises :class:`~asymml.errors.IntegrityError`
            and closes the connection.
    """

    can_verify = True

    def __init__(self, address: str, *, audit: bool = False, timeout: float | None = 300.0,
                 connect_timeout: float = 10.0, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_ca: str | None = None, insecure: bool = False, verify: bool = True) -> None:
        self.address = parse_address(address)
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"request timeout must be positive (or None), got {timeout!r}")
        tls = TLSConfig.from_options(tls_cert, tls_key, tls_ca)
        if tls is None and not self.address.is_local and not insecure:
            raise ConfigError(
                f"refusing an unauthenticated, unencrypted link to {self.address}: pass tls_cert/tls_key/tls_ca "
                "(--tls-cert/--tls-key/--tls-ca; `asymml certs --out DIR` makes a test set) or, on a network you "
                "trust, insecure=True (--insecure)")
        self.tls = tls
        self.ledger = Ledger(audit)
        self.home = torch.device("cpu")
        self.timeout = timeout
        self._closed: BaseException | None = None
        self._async_error: BaseException | None = None
        self._pending: dict[int, _Pending] = {}
        self._one_way_ids: deque[int] = deque(maxlen=1 << 16)
        self._one_way_set: set[int] = set()
        self._plock = threading.Lock()
        self._req_ids = itertools.count(1)
        self._hids = itertools.count()
        self._wids = itertools.count()
        self._weights: dict[int, _Weight] = {}
        self._dead_wids: deque[int] = deque()
        self._programs: dict[int, tuple[list[Instr], int]] = {}
        self._pids = itertools.count()
        self._fwd_shapes: dict[int, tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], torch.dtype]]]] = {}
        self._shape_helper = Verifier(rounds=1)  # shape inference (and its cache), whether or not we verify
        self.verifier: Verifier | None = None
        self._outq: queue.SimpleQueue = queue.SimpleQueue()
        sock = connect(self.address, connect_timeout)
        ctx = None
        if tls is not None:
            ctx = tls.client_context(check_hostname=self.address.scheme == "tcp")
        try:
            self._t = Transport.wrap(sock, ctx, server_side=False,
                                     server_hostname=self.address.host if self.address.scheme == "tcp" else None,
                                     deadline=time.monotonic() + connect_timeout)
        except (ssl.SSLError, ssl.CertificateError, OSError) as e:
            sock.close()
            raise AcceleratorConnectionError(f"TLS handshake with the accelerator server at {self.address} failed: "
                                             f"{e}") from None
        self._reader = threading.Thread(target=self._read_loop, name="asymml-remote-rx", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="asymml-remote-tx", daemon=True)
        self._reader.start()
        self._writer.start()
        try:
            info = self._call({"op": "hello", "version": PROTOCOL_VERSION}, timeout=connect_timeout).result(
                timeout=connect_timeout + 1.0)
        except FutureTimeoutError:
            self.close()
            raise AcceleratorConnectionError(f"accelerator server at {self.address} did not answer the handshake "
                                             f"within {connect_timeout}s") from None
        except AcceleratorConnectionError as e:
            self.close()
            raise AcceleratorConnectionError(f"accelerator server at {self.address} did not complete the handshake "
                                             f"within {connect_timeout}s: {e}") from None
        except BaseException:
            self.close()
            raise
        self.server_info: dict[str, Any] = info
        try:
            self.device = torch.device(info["device"])
        except (KeyError, TypeError, RuntimeError):
            self.close()
            raise AcceleratorConnectionError(f"bad handshake from {self.address}: {str(info)[:200]}") from None
        self.verify = verify

    # ------------------------------------------------------------------ plumbing
    @property
    def audit(self) -> bool:
        return self.ledger.audit

    @audit.setter
    def audit(self, on: bool) -> None:
        self.ledger.audit = on


    def _check(self) -> None:
        if self._closed is not None:
            if isinstance(self._closed, IntegrityError):
                raise IntegrityError(f"accelerator server at {self.address} was disconnected after a failed "
                                     f"verification: {self._closed}")
            raise AcceleratorConnectionError(f"accelerator server at {self.address} is not reachable: {self._closed}")
        err, self._async_error = self._async_error, None
        if err is not None:
            raise err

    def _call(self, msg: dict[str, Any], decode: Callable[[Any], Any] = lambda r: r, *,
              max_payload: int = 0, timeout: float | None = -1.0) -> Future:
        fut: Future = Future()
        rid = next(self._req_ids)
        msg["id"] = rid
        bufs = encode_message(msg)
        t = self.timeout if timeout == -1.0 else timeout
        entry = _Pending(fut, decode, None if t is None else time.monotonic() + t, max_payload + _SLACK, msg["op"])
        with self._plock:
            if self._closed is not None:
                raise AcceleratorConnectionError(f"accelerator server at {self.address} is not reachable: {self._closed}")
            self._pending[rid] = entry
        self._outq.put(bufs)
        return fut

    def _one_way(self, msg: dict[str, Any]) -> list[Any]:
        rid = next(self._req_ids)
        msg["id"] = rid
        with self._plock:
            if len(self._one_way_ids) == self._one_way_ids.maxlen:
                self._one_way_set.discard(self._one_way_ids[0])
            self._one_way_ids.append(rid)
            self._one_way_set.add(rid)
        bufs = encode_message(msg)
        self._outq.put(bufs)
        return bufs

    def _fail(self, exc: BaseException) -> None:
        """Fail every pending request and close: after any error the stream cannot be trusted."""
        with self._plock:
            if self._closed is None:
                self._closed = exc
            pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.fut.done():
                if isinstance(exc, (IntegrityError, ProtocolError)):
                    err: BaseException = type(exc)(f"accelerator server at {self.address}: {exc}")
                else:
                    err = AcceleratorConnectionError(f"accelerator server at {self.address}: {exc}")
                p.fut.set_exception(err)
        self._t.shutdown()
        self._outq.put(_STOP)

    def _write_loop(self) -> None:
        while True:
            bufs = self._outq.get()
            if bufs is _STOP:
                return
            if self._closed is not None:
                continue
            try:
                send_buffers(self._t, bufs)
            except (OSError, ssl.SSLError) as e:
                self._fail(ConnectionError(f"connection lost while sending ({getattr(e, 'strerror', None) or e})"))

    def _deadline(self) -> float | None:
        with self._plock:
            ds = [p.deadline for p in self._pending.values() if p.deadline is not None]
        return min(ds) if ds else None

    def _alive(self) -> bool:
        return self._closed is None

    def _read_one(self) -> None:
        t, dl, alive = self._t, self._deadline, self._alive
        hlen, plen = read_prefix(t, dl, alive, max_header=MAX_REPLY_HEADER_BYTES)
        doc = parse_header(bytes(recv_exact(t, hlen, dl, alive)))
        msg = doc["msg"]
        rid = msg.get("id")
        with self._plock:
            entry = self._pending.get(rid) if type(rid) is int else None
            one_way = entry is None and type(rid) is int and rid in self._one_way_set and msg.get("ok") is False
            if one_way:
                self._one_way_set.discard(rid)
        if entry is None and not one_way:
            raise ProtocolError(f"unsolicited frame from the server (id {str(rid)[:30]}, ok={msg.get('ok')!r}): "
                                + (str(msg.get("error"))[:300] if msg.get("ok") is False else "no such request"))
        limit = entry.max_payload if entry is not None else _ERROR_REPLY_BYTES
        if plen > limit:
            raise ProtocolError(f"reply to a {entry.op if entry else 'one-way'} request claims {plen} payload bytes; "
                                f"at most {limit} expected")
        payload = recv_exact(t, plen, dl, alive) if plen else bytearray()
        msg = decode_body(doc, payload)
        if entry is None:  # a one-way request failed on the server
            err = RemoteError(f"accelerator server: {str(msg.get('type', 'Error'))[:100]}: {str(msg.get('error'))[:1000]}")
            log.error("%s", err)
            if self._async_error is None:
                self._async_error = err
            return
        with self._plock:
            self._pending.pop(rid, None)
        if msg.get("ok") is True:
            try:
                entry.fut.set_result(entry.decode(msg.get("result")))
            except IntegrityError as e:
                entry.fut.set_exception(e)
                self._fail(e)
            except Exception as e:  # a malformed answer
                entry.fut.set_exception(ProtocolError(f"malformed answer from the accelerator server: {e}"))
        elif msg.get("ok") is False:
            entry.fut.set_exception(RemoteError(f"accelerator server: {str(msg.get('type', 'Error'))[:100]}: "
                                                f"{str(msg.get('error'))[:1000]}"))
        else:
            raise ProtocolError("reply without a boolean 'ok'")

    def _read_loop(self) -> None:
        try:
            while True:
                self._read_one()
        except BaseException as e:  # noqa: BLE001 - whatever happened, no request may wait forever
            if isinstance(e, TimeoutError):
                e = TimeoutError("no answer within the request timeout (server hung, overloaded or dripping)")
            elif isinstance(e, ssl.SSLError):
                e = ConnectionError(f"TLS error ({e.reason or e})")
            elif isinstance(e, OSError) and not isinstance(e, ConnectionError):
                e = ConnectionError(f"connection lost ({e.strerror or e})")
            elif isinstance(e, MemoryError):
                e = ProtocolError("reply too large for this process's memory")
            elif not isinstance(e, (ConnectionError, ProtocolError, IntegrityError)):
                e = ProtocolError(f"unreadable reply ({type(e).__name__}: {e})")
            self._fail(e)

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
        bufs = self._one_way({"op": "release", "hid": hid, "layer": layer, "kind": kind, "tensor": tensor})
        v = self.verifier
        if v is not None:  # the snapshot that was sent (the caller may reuse its tensor)
            sent = sent_tensors(bufs)
            v.release(hid, sent[0] if sent else tensor)
        return Handle(hid, tuple(tensor.shape))

    def discard(self, handles: list[Handle]) -> None:
        if handles and self._closed is None:
            self._one_way({"op": "discard", "hids": [h.id for h in handles]})
        v = self.verifier
        if v is not None:
            v.discard([h.id for h in handles])

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
        dtype = next((p.dtype for p in params.values() if p.is_floating_point()), torch.float32)
        shapes, _ = self._shape_helper.shapes(program, {n: h.shape for n, h in inputs.items()}, params, dtype)
        unknown = [o for o in outputs if o not in shapes]
        if unknown:
            raise ValueError(f"{layer}: outputs {unknown} are not values of the program")
        names, new = self._weights_msg(params, layer)
        drop = []
        while self._dead_wids:
            drop.append(self._dead_wids.popleft())
        msg = {
            "op": "forward", "key": key, "program": self._program_msg(program),
            "inputs": {n: h.id for n, h in inputs.items()}, "params": names, "weights": new, "drop": drop,
            "outputs": list(outputs), "layer": layer, "keep_graph": bool(keep_graph), "grad_params": list(grad_params),
        }
        if keep_graph:
            self._fwd_shapes[key] = (shapes, {n: (tuple(p.shape), p.dtype) for n, p in params.items()})
        v = self.verifier
        hids = {n: h.id for n, h in inputs.items()}

        def decode(res: Any) -> dict[str, Tensor | None]:
            if not isinstance(res, dict) or not all(v is None or isinstance(v, Tensor) for v in res.values()):
                raise IntegrityError(f"forward result of layer {layer!r} must map names to tensors")
            if v is not None:
                v.check_forward(key, program, hids, params, outputs, res, layer=layer, keep_graph=keep_graph)
            return res

        limit = payload_size(shapes[o] for o in outputs if shapes.get(o) is not None)
        return self._call(msg, decode, max_payload=limit)

    def backward(self, key: int, request: BackwardRequest) -> Future[dict[str, dict[str, Tensor | None]]]:
        self._check()
        msg = {
            "op": "backward", "key": key,
            "grad_outputs": {n: (None if h is None else h.id) for n, h in request.grad_outputs.items()},
            "input_grads": list(request.input_grads), "param_grads": list(request.param_grads),
            "value_grads": list(request.value_grads), "values": list(request.values),
        }
        shapes, pshapes = self._fwd_shapes.pop(key, ({}, {}))
        want = [shapes.get(n) for n in (*request.input_grads, *request.value_grads, *request.values)]
        want += [pshapes.get(n) for n in request.param_grads]
        limit = payload_size(s for s in want if s is not None)
        v = self.verifier

        def decode(res: Any) -> dict[str, dict[str, Tensor | None]]:
            sections = ("input_grads", "param_grads", "value_grads", "values")
            if not isinstance(res, dict) or set(res) != set(sections):
                raise IntegrityError("backward result must have input_grads/param_grads/value_grads/values")
            for s in sections:
                if not isinstance(res[s], dict) or not all(v is None or isinstance(v, Tensor) for v in res[s].values()):
                    raise IntegrityError(f"backward result section {s} must map names to tensors")
            if v is not None:
                v.check_backward(key, request, res)
            return res

        return self._call(msg, decode, max_payload=limit)

    def free(self, key: int) -> None:
        self._fwd_shapes.pop(key, None)
        v = self.verifier
        if v is not None:
            v.free(key)
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

        def decode(res: Any) -> dict[str, dict[str, float]]:
            if not isinstance(res, dict) or not all(
                isinstance(d, dict) and all(isinstance(x, (int, float)) for x in d.values()) for d in res.values()
            ):
                raise ProtocolError("stats must map layer names to {name: number}")
            return res

        return self._call({"op": "stats"}, decode).result()

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
        self._outq.put(_STOP)
        self._t.shutdown()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=5.0)
        self._t.close()

    def __enter__(self) -> RemoteExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteExecutor({str(self.address)!r})"


def make_executor(spec: str | torch.device, *, audit: bool = False, tls_cert: str | None = None,
                  tls_key: str | None = None, tls_ca: str | None = None, insecure: bool = False,
                  timeout: float | None = 300.0, verify: bool | None = None) -> Executor:
    """An executor from a device-or-address string: ``tcp://…`` / ``unix://…`` give a :class:`RemoteExecutor`
    (with the TLS options, the per-request ``timeout`` and ``insecure`` as there), anything else (``cpu``,
    ``cuda:1``, ``auto``) a :class:`~asymml.executors.local.LocalExecutor`. ``verify=None`` keeps each
    executor's default (on for remote, off for local)."""
    if is_address(spec):
        return RemoteExecutor(str(spec), audit=audit, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca,
                              insecure=insecure, timeout=timeout, verify=True if verify is None else verify)
    if any(x is not None for x in (tls_cert, tls_key, tls_ca)):
        raise ConfigError(f"TLS options apply to a remote accelerator (tcp://… or unix://…), not to device {spec!r}")
    from .local import LocalExecutor

    return LocalExecutor(spec, audit=audit, verify=bool(verify))
