"""The accelerator server of level 2 (``asymml serve``): a :class:`LocalExecutor` behind a socket.

It runs outside the enclave, next to the GPU, and is the *untrusted* party: it sees exactly what the
client's ledger records (released residuals/gradients, public weights, public programs) and nothing else.
Each connection gets its own :class:`~asymml.executors.local.LocalExecutor` (its own tensor store and kept
graphs), and is served in order by one thread: state changes (releases, forwards, backwards, frees) are
applied in the order the client sent them, while the computations run on the executor's worker thread and
answer when they finish. Malformed messages are refused with an error reply; a broken frame (wrong magic,
absurd sizes) ends that connection only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import ssl
import stat
import threading
import time
from concurrent.futures import Future
from typing import Any

import torch

from ..errors import ConfigError, ProtocolError
from ..ledger import KINDS
from .addresses import Address, parse_address, tune
from .base import BackwardRequest, Handle
from .local import LocalExecutor
from .ops import Instr, ProgramError, infer_shapes
from .tls import TLSConfig
from .wire import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_HEADER_BYTES,
    ONE_WAY,
    PROTOCOL_VERSION,
    Transport,
    decode_body,
    decode_program,
    encode_message,
    parse_header,
    read_prefix,
    recv_exact,
    send_buffers,
)

log = logging.getLogger("asymml.serve")


# ---------------------------------------------------------------------------------------------- validation
def _field(msg: dict[str, Any], name: str, typ: type | tuple[type, ...], what: str) -> Any:
    v = msg.get(name)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ProtocolError(f"{msg.get('op')}: field {name!r} must be {what}, got {type(v).__name__}")
    return v


def _names(msg: dict[str, Any], name: str) -> list[str]:
    v = _field(msg, name, list, "a list of names")
    if not all(isinstance(x, str) for x in v):
        raise ProtocolError(f"{msg.get('op')}: field {name!r} must be a list of names")
    return v


def _int_map(msg: dict[str, Any], name: str, none_ok: bool = False) -> dict[str, int | None]:
    v = _field(msg, name, dict, "an object")
    for k, x in v.items():
        if not ((type(x) is int) or (none_ok and x is None)):
            raise ProtocolError(f"{msg.get('op')}: {name}[{k!r}] must be an integer id")
    return v


def _ids(msg: dict[str, Any], name: str) -> list[int]:
    v = _field(msg, name, list, "a list of integer ids")
    if not all(type(x) is int for x in v):
        raise ProtocolError(f"{msg.get('op')}: field {name!r} must be a list of integer ids")
    return v


# ---------------------------------------------------------------------------------------------- one client
class Connection:
    """The state of one client: its executor, handle/weight/program tables and the reply channel."""

    def __init__(self, server: AcceleratorServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.raw = sock
        self.t: Transport | None = None
        self.peer = peer
        self.ex = LocalExecutor(server.device)
        self.handles: dict[int, Handle] = {}
        self.weights: dict[int, torch.Tensor] = {}
        self.programs: dict[int, list[Instr]] = {}
        self.forwards: dict[int, Future] = {}
        self.send_lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.alive = True
        self.inflight = 0  # jobs submitted and not yet answered (the connection is not idle meanwhile)
        self.last_active = time.monotonic()

    # ---------------------------------------------------------- replies
    def reply(self, rid: Any, result: Any = None, *, error: BaseException | None = None) -> None:
        if error is None:
            msg: dict[str, Any] = {"id": rid, "ok": True, "result": result}
        else:
            self.errors += 1
            msg = {"id": rid if type(rid) is int else None, "ok": False, "type": type(error).__name__,
                   "error": str(error)}
        try:
            bufs = encode_message(msg, copy=False)
        except Exception as e:  # a result that is not data: report instead
            bufs = encode_message({"id": rid, "ok": False, "type": type(e).__name__, "error": str(e)})
        with self.send_lock:
            if not self.alive:
                return
            try:
                send_buffers(self.t if self.t is not None else self.raw, bufs)
            except (OSError, ssl.SSLError) as e:
                log.warning("%s: cannot send reply (%s); dropping the connection", self.peer, e)
                self.alive = False
                with contextlib.suppress(OSError):
                    self.raw.shutdown(socket.SHUT_RDWR)

    def reply_when_done(self, rid: Any, fut: Future) -> None:
        with self.send_lock:
            self.inflight += 1

        def done(f: Future) -> None:
            with self.send_lock:
                self.inflight -= 1
                self.last_active = time.monotonic()
            exc = f.exception()
            if exc is not None:
                log.warning("%s: request %s failed: %s: %s", self.peer, rid, type(exc).__name__, exc)
                self.reply(rid, error=exc)
            else:
                self.reply(rid, f.result())

        fut.add_done_callback(done)

    # ---------------------------------------------------------- dispatch
    def handle(self, msg: dict[str, Any]) -> bool:
        """Apply one request; False ends the connection (``bye``)."""
        op = msg.get("op")
        rid = msg.get("id")
        self.requests += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: request %s %s (layer %s)", self.peer, rid, op, msg.get("layer", "-"))
        try:
            if type(rid) is not int:
                raise ProtocolError("every request needs an integer 'id'")
            fn = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
            if fn is None:
                raise ProtocolError(f"unknown operation {op!r}")
            if op == "bye":
                return False
            out = fn(msg)
            if isinstance(out, Future):
                self.reply_when_done(rid, out)
            elif op not in ONE_WAY:
                self.reply(rid, out)
        except Exception as e:  # refuse, answer, keep serving
            log.warning("%s: refused %s request %s: %s: %s", self.peer, op if isinstance(op, str) else "?", rid,
                        type(e).__name__, e)
            self.reply(rid, error=e)
        return True

    def _handle(self, hid: int) -> Handle:
        h = self.handles.get(hid)
        if h is None:
            raise ProtocolError(f"unknown tensor handle {hid} (never released, already discarded or consumed)")
        return h

    def op_hello(self, msg: dict[str, Any]) -> dict[str, Any]:
        version = msg.get("version")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version!r} not supported (server speaks {PROTOCOL_VERSION})")
        return {"device": str(self.ex.device), "protocol": PROTOCOL_VERSION, "torch": torch.__version__,
                "pid": os.getpid()}

    def op_release(self, msg: dict[str, Any]) -> None:
        hid = _field(msg, "hid", int, "an integer id")
        layer = _field(msg, "layer", str, "a string")
        kind = _field(msg, "kind", str, "a string")
        t = _field(msg, "tensor", torch.Tensor, "a tensor")
        if kind not in KINDS:
            raise ProtocolError(f"release: unknown kind {kind!r}")
        if hid in self.handles:
            raise ProtocolError(f"release: handle {hid} already in use")
        self.handles[hid] = self.ex.release(t, layer=layer, kind=kind)

    def op_discard(self, msg: dict[str, Any]) -> None:
        hs = [self.handles.pop(h) for h in _ids(msg, "hids") if h in self.handles]
        self.ex.discard(hs)

    def op_free(self, msg: dict[str, Any]) -> None:
        key = _field(msg, "key", int, "an integer")
        fut = self.forwards.pop(key, None)
        if fut is not None and not fut.done():
            fut.add_done_callback(lambda _f: self.ex.free(key))  # the graph is kept when the job ends
        self.ex.free(key)

    def _forget_weight(self, t: torch.Tensor | None) -> None:
        # the executor caches device copies of weights by id(); drop the entry before the tensor dies so a
        # later tensor reusing the id is never mistaken for it
        if t is not None:
            self.ex.forget_weight(t)

    def op_drop_weights(self, msg: dict[str, Any]) -> None:
        for wid in _ids(msg, "wids"):
            self._forget_weight(self.weights.pop(wid, None))

    def op_forward(self, msg: dict[str, Any]) -> Future:
        key = _field(msg, "key", int, "an integer")
        prog_msg = _field(msg, "program", dict, "an object")
        pid = _field(prog_msg, "pid", int, "an integer")
        if "instrs" in prog_msg:
            self.programs[pid] = decode_program(prog_msg["instrs"])
        # state updates first (the client assumes they happened), then the checks that may refuse the job
        weights = _field(msg, "weights", list, "a list of [id, tensor] pairs")
        for w in weights:
            if not (isinstance(w, list) and len(w) == 2 and type(w[0]) is int and isinstance(w[1], torch.Tensor)):
                raise ProtocolError("forward: weights must be [id, tensor] pairs")
        for wid, t in weights:
            self._forget_weight(self.weights.get(wid))
            self.weights[wid] = t
        for wid in _ids(msg, "drop"):
            self._forget_weight(self.weights.pop(wid, None))
        program = self.programs.get(pid)
        if program is None:
            raise ProtocolError(f"forward: unknown program {pid}")
        inputs = {n: self._handle(h) for n, h in _int_map(msg, "inputs").items()}
        params = {}
        for n, wid in _int_map(msg, "params").items():
            if wid not in self.weights:
                raise ProtocolError(f"forward: unknown weight id {wid} for {n!r}")
            params[n] = self.weights[wid]
        outputs = _names(msg, "outputs")
        layer = _field(msg, "layer", str, "a string")
        # shapes first: refuses programs that do not apply to these inputs or would blow up (e.g. a padding
        # far larger than the kernel) before anything is allocated
        dtype = next((t.dtype for t in params.values()), torch.float32)
        try:
            shapes = infer_shapes(program, {n: (h.shape, dtype) for n, h in inputs.items()},
                                  {n: (tuple(t.shape), t.dtype) for n, t in params.items()},
                                  max_numel=self._value_limit(inputs, params))
        except ProgramError as e:
            raise ProtocolError(f"forward ({layer[:100]}): {e}") from None
        missing = [o for o in outputs if o not in shapes]
        if missing:
            raise ProtocolError(f"forward: outputs {missing[:5]} are not values of the program")
        keep = _field(msg, "keep_graph", bool, "a boolean")
        grad_params = tuple(_names(msg, "grad_params"))
        fut = self.ex.forward(key, program, inputs, params, outputs, layer=layer, keep_graph=keep, grad_params=grad_params)
        if keep:
            self.forwards[key] = fut
            if len(self.forwards) > 4096:  # bookkeeping only; drop finished entries
                self.forwards = {k: f for k, f in self.forwards.items() if not f.done()}
        return fut

    def _value_limit(self, inputs: dict[str, Handle], params: dict[str, torch.Tensor]) -> int:
        """The largest value a program may create: proportional to what the client sent for it (legitimate
        layers grow data by channel ratios or small upsampling, far below 256×), and within the message limit."""
        sent = sum(math.prod(h.shape) for h in inputs.values()) + sum(t.numel() for t in params.values())
        return min(self.server.max_payload // 4, 256 * sent + (1 << 20))

    def op_backward(self, msg: dict[str, Any]) -> Future:
        key = _field(msg, "key", int, "an integer")
        gids = _int_map(msg, "grad_outputs", none_ok=True)
        grads = {n: (None if h is None else self._handle(h)) for n, h in gids.items()}
        req = BackwardRequest(grads, _names(msg, "input_grads"), _names(msg, "param_grads"),
                              _names(msg, "value_grads"), _names(msg, "values"))
        for h in gids.values():  # the executor consumes released gradients
            if h is not None:
                self.handles.pop(h, None)
        self.forwards.pop(key, None)
        return self.ex.backward(key, req)

    def op_stats(self, msg: dict[str, Any]) -> dict[str, dict[str, float]]:
        self.ex.synchronize()
        return self.ex.stats()

    def op_reset_stats(self, msg: dict[str, Any]) -> None:
        self.ex.synchronize()
        self.ex.reset_stats()

    def op_set_profiling(self, msg: dict[str, Any]) -> None:
        self.ex.set_profiling(_field(msg, "on", bool, "a boolean"))

    def op_sync(self, msg: dict[str, Any]) -> None:
        self.ex.synchronize()

    def op_bye(self, msg: dict[str, Any]) -> None:  # handled in handle()
        return None

    # ---------------------------------------------------------- loop
    def _idle_deadline(self) -> float | None:
        idle = self.server.idle_timeout
        if idle is None or self.inflight:
            return None
        return self.last_active + idle

    def _read(self) -> tuple[bytes, bytearray]:
        t = self.t
        assert t is not None
        alive = lambda: self.alive and not self.server._stopping.is_set()  # noqa: E731
        frame_deadline: list[float] = []
        dl = lambda: frame_deadline[0] if frame_deadline else None  # noqa: E731

        def start() -> float | None:
            return self._idle_deadline()

        hlen, plen = read_prefix(t, dl, alive, first_byte_deadline=start, max_header=MAX_HEADER_BYTES)
        frame_deadline.append(time.monotonic() + self.server.frame_timeout)
        if plen > self.server.max_payload:
            raise ProtocolError(f"payload of {plen} bytes exceeds the limit of {self.server.max_payload}")
        header = bytes(recv_exact(t, hlen, dl, alive))
        payload = recv_exact(t, plen, dl, alive) if plen else bytearray()
        self.last_active = time.monotonic()
        return header, payload

    def serve(self) -> None:
        srv = self.server
        try:
            try:
                self.t = Transport.wrap(self.raw, srv.ssl_context, server_side=True,
                                        deadline=time.monotonic() + srv.handshake_timeout)
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as e:
                log.warning("%s: refused: TLS handshake failed (%s)", self.peer, e)
                return
            if self.t.tls is not None:
                cert = self.t.peer_certificate or {}
                subject = dict(x[0] for x in cert.get("subject", ()))
                log.info("%s: authenticated as %r", self.peer, subject.get("commonName", "?"))
            while self.alive:
                try:
                    header, payload = self._read()
                except ProtocolError as e:  # framing lost: answer once, then hang up
                    log.warning("%s: broken frame (%s); closing the connection", self.peer, e)
                    self.reply(None, error=e)
                    return
                except TimeoutError:
                    log.info("%s: idle or stalled beyond the server's limits; closing the connection", self.peer)
                    return
                try:
                    msg = decode_body(parse_header(header), payload)
                except ProtocolError as e:
                    log.warning("%s: refused malformed message: %s", self.peer, e)
                    self.reply(None, error=e)
                    continue
                if not self.handle(msg):
                    return
        except (ConnectionError, OSError, ssl.SSLError) as e:
            if self.alive and not srv._stopping.is_set():
                log.info("%s: connection ended (%s)", self.peer, e)
        finally:
            self.close()

    def close(self) -> None:
        with self.send_lock:
            self.alive = False
        with contextlib.suppress(Exception):
            self.ex.close()
        with contextlib.suppress(OSError):
            self.raw.shutdown(socket.SHUT_RDWR)
        self.raw.close()
        led = self.ex.ledger
        log.info("%s: closed after %d requests (%d refused); received %s; %.1f MiB of private-derived tensors",
                 self.peer, self.requests, self.errors, dict(led.count_by_kind) or "nothing",
                 led.private_bytes() / 2**20)


# ---------------------------------------------------------------------------------------------- server
class AcceleratorServer:
    """Serve the accelerator at ``address`` (``tcp://host:port``, port 0 picks a free one, or ``unix:///path``).

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``. Binds immediately (``address`` is then the
    actual bound address); call :meth:`serve_forever` to accept clients and :meth:`shutdown` (any thread) to stop.

    Security: with ``tls`` (a :class:`~asymml.executors.tls.TLSConfig`) every client must present a
    certificate signed by its CA (mutual TLS). Without it the server is unauthenticated and unencrypted:
    that needs ``insecure=True`` and is refused on any address other than loopback or a Unix socket.

    Limits against hostile clients: at most ``max_connections`` at once (more are answered with an error and
    closed), a connection idle (no request, no job running) for ``idle_timeout`` seconds is closed, a frame
    must arrive whole within ``frame_timeout`` seconds of its first byte, TLS handshakes within
    ``handshake_timeout``, messages are at most ``max_payload`` bytes, and ``accept()`` failures (e.g. out of
    file descriptors) pause accepting briefly instead of stopping the server.
    """

    #: serves one client (a subclass may be substituted, e.g. by tests that play a malicious accelerator)
    connection_class: type[Connection] = Connection

    def __init__(self, address: str, device: str = "auto", *, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 tls: TLSConfig | None = None, insecure: bool = False, max_connections: int = 16,
                 idle_timeout: float | None = 3600.0, frame_timeout: float = 600.0,
                 handshake_timeout: float = 10.0) -> None:
        addr = parse_address(address)
        if tls is None:
            if not insecure:
                raise ConfigError("refusing to serve without TLS: pass --tls-cert/--tls-key/--tls-ca (mutual TLS; "
                                  "`asymml certs --out DIR` makes a test set) or, on this host only, --insecure")
            if not addr.is_local:
                raise ConfigError(f"refusing to serve without TLS on the non-loopback address {addr}: anyone who can "
                                  "reach it could drive the accelerator and read what crosses; use mutual TLS")
        if max_connections < 1:
            raise ConfigError(f"max_connections must be positive, got {max_connections}")
        self.ssl_context: ssl.SSLContext | None = tls.server_context() if tls is not None else None
        self.insecure = tls is None
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.handshake_timeout = handshake_timeout
        probe = LocalExecutor(device)  # validates the device early (clear error, before binding)
        self.device = probe.device
        probe.close()
        self.max_payload = max_payload
        self._addr = addr
        self._stopping = threading.Event()
        self._conns: set[Connection] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._unix_path: str | None = None
        self._listener = self._bind(self._addr)

    @property
    def address(self) -> str:
        """The bound address (with the real port when 0 was asked)."""
        return str(self._addr)

    def _bind(self, addr: Address) -> socket.socket:
        if addr.scheme == "unix":
            path = addr.path
            if os.path.lexists(path):
                if not stat.S_ISSOCK(os.lstat(path).st_mode):
                    raise OSError(f"{path} exists and is not a socket; refusing to replace it")
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(path)
                except OSError:
                    os.unlink(path)  # a stale socket from a dead server
                else:
                    raise OSError(f"another server is already listening on unix://{path}")
                finally:
                    probe.close()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o077)  # the socket is for this user only
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            self._unix_path = path
        else:
            infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            self._addr = Address("tcp", host=addr.host, port=sock.getsockname()[1])
        sock.listen(64)
        sock.settimeout(0.2)  # lets serve_forever notice shutdown()
        return sock

    def serve_forever(self) -> None:
        """Accept and serve clients (one thread each) until :meth:`shutdown`."""
        log.info("accelerator server listening on %s (device %s, torch %s, %d threads, %s)", self.address,
                 self.device, torch.__version__, torch.get_num_threads(),
                 "UNAUTHENTICATED (--insecure)" if self.insecure else "mutual TLS")
        n_unix = 0
        try:
            while not self._stopping.is_set():
                try:
                    sock, peer = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError as e:
                    if self._stopping.is_set():
                        break
                    # EMFILE/ENFILE/ENOBUFS/ENOMEM/ECONNABORTED…: one failed accept must not stop the server
                    log.warning("accept() failed (%s); pausing briefly", e.strerror or e)
                    self._stopping.wait(0.2)
                    continue
                try:
                    self._admit(sock, peer, n_unix)
                except Exception as e:  # never let one connection take the server down
                    log.warning("cannot start serving a connection (%s)", e)
                    with contextlib.suppress(OSError):
                        sock.close()
                n_unix += 1
        finally:
            self._cleanup()

    def _admit(self, sock: socket.socket, peer: Any, n: int) -> None:
        sock.settimeout(None)
        tune(sock)
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"unix-client-{n}"
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            full = len(self._conns) >= self.max_connections
        if full:
            log.warning("%s: refused: %d connections already (--max-connections)", name, self.max_connections)
            if self.ssl_context is None:  # a plain client gets a reason; a TLS client just sees the close
                with contextlib.suppress(OSError):
                    sock.settimeout(1.0)
                    send_buffers(sock, encode_message({"id": None, "ok": False, "type": "ServerBusy",
                                                       "error": f"server busy ({self.max_connections} connections)"}))
            with contextlib.suppress(OSError):
                sock.close()
            return
        log.info("%s: connected", name)
        conn = self.connection_class(self, sock, name)
        with self._lock:
            self._conns.add(conn)
        t = threading.Thread(target=self._run_conn, args=(conn,), name=f"asymml-serve-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def _run_conn(self, conn: Connection) -> None:
        try:
            conn.serve()
        except Exception:  # never let one client take the server down
            log.exception("%s: unexpected error", conn.peer)
            conn.close()
        finally:
            with self._lock:
                self._conns.discard(conn)

    def shutdown(self) -> None:
        """Stop accepting, close every connection (callable from any thread or a signal handler)."""
        self._stopping.set()

    def _cleanup(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.raw.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5.0)
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
            self._unix_path = None
        log.info("accelerator server stopped")

    def __enter__(self) -> AcceleratorServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
