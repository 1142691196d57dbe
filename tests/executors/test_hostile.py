"""Hostile peers (issue 12, items 3 and 5), loopback only and bounded in time.

A malicious accelerator (tampered results, dripping, unsolicited frames, huge headers and payload claims)
must end every request with a clear error within a bounded time; a fuzzing client must leave the server
serving the next valid client; descriptor exhaustion must not stop the server."""

from __future__ import annotations

import os
import random
import resource
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from hostile_util import FakeServer, batch, reply, serving, split_all, tiny

from asymml.errors import AcceleratorConnectionError, AsymmlError, ConfigError, IntegrityError, ProtocolError
from asymml.executors.remote import RemoteExecutor
from asymml.executors.server import AcceleratorServer, Connection
from asymml.executors.wire import decode_message, encode_message, read_frame

BOUND_S = 10.0  # every hostile case must end within this


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ tampering server
def _first(d):
    return next(k for k, v in d.items() if isinstance(v, torch.Tensor))


def _t_forward(fn):
    def tamper(res):
        if isinstance(res, dict) and "input_grads" not in res and any(isinstance(v, torch.Tensor) for v in res.values()):
            k = _first(res)
            res = dict(res)
            res[k] = fn(res[k])
        return res
    return tamper


def _t_backward(section, fn):
    def tamper(res):
        if isinstance(res, dict) and "input_grads" in res and any(isinstance(v, torch.Tensor) for v in res[section].values()):
            res = {s: dict(d) for s, d in res.items()}
            k = _first(res[section])
            res[section][k] = fn(res[section][k])
        return res
    return tamper


def _one(t):
    t = t.clone(memory_format=torch.contiguous_format)  # (results may be channels-last on the wire)
    t.view(-1)[t.numel() // 3] += t.abs().mean() + 1e-3
    return t


TAMPERS = {
    "scaled x1.5": _t_forward(lambda t: t * 1.5),
    "NaN": _t_forward(lambda t: t.clone().fill_(float("nan"))),
    "wrong shape": _t_forward(lambda t: t[..., :-1].contiguous()),
    "shape-(1,) broadcast": _t_forward(lambda t: t.reshape(-1)[:1].clone()),
    "truncated batch": _t_forward(lambda t: t[:-1].contiguous()),
    "int64 cast": _t_forward(lambda t: t.long()),
    "one element": _t_forward(_one),
    "replaced param grads": _t_backward("param_grads", lambda t: torch.randn_like(t) * t.std()),
    "one input-grad element": _t_backward("input_grads", _one),
    "values x1.01": _t_backward("values", lambda t: t * 1.01),
}


class EvilConnection(Connection):
    """The real server, with every successful reply passed through the server's current tamper."""

    def reply(self, rid, result=None, *, error=None):
        tamper = self.server.tamper
        if error is None and tamper is not None:
            result = tamper(result)
        super().reply(rid, result, error=error)


class EvilServer(AcceleratorServer):
    connection_class = EvilConnection
    tamper = None


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    server = EvilServer("tcp://127.0.0.1:0", "cpu", insecure=True)
    with serving(server):
        yield server


def _step(ex, seed=0):
    sm = split_all(tiny(seed), executor=ex)
    sm(batch(seed=seed)).square().mean().backward()


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampered_results_are_refused(evil, name):
    evil.tamper = None
    with RemoteExecutor(evil.address, timeout=BOUND_S) as ex:
        assert ex.verify  # on by default for a remote accelerator
        _step(ex)  # honest first: no false alarm
        evil.tamper = TAMPERS[name]
        t0 = time.monotonic()
        try:
            # a larger dtype may already exceed the reply size the client expects: refused before decoding
            with pytest.raises((IntegrityError, ProtocolError), match="failed verification|at most"):
                _step(ex)
        finally:
            evil.tamper = None
        assert time.monotonic() - t0 < BOUND_S
        with pytest.raises(AsymmlError):  # the connection is not used again
            ex.synchronize()


def test_without_verification_a_scaled_result_goes_through(evil):
    """Why verification is on: the same ×1.5 server, unverified, silently changes the gradients."""
    evil.tamper = None
    with RemoteExecutor(evil.address, timeout=BOUND_S, verify=False) as ex:
        m = tiny()
        split_all(m, executor=ex)(batch()).square().mean().backward()
        honest = [p.grad.clone() for p in m.parameters()]
        evil.tamper = TAMPERS["scaled x1.5"]
        try:
            m2 = tiny()
            split_all(m2, executor=ex)(batch()).square().mean().backward()
        finally:
            evil.tamper = None
        assert any(not torch.allclose(a, p.grad) for a, p in zip(honest, m2.parameters()))


# ------------------------------------------------------------------------------------------ protocol abuse
def _drip(conn, msg):
    frame = b"".join(bytes(b) for b in encode_message({"id": msg["id"], "ok": True, "result": None})[:-1])
    for i in range(len(frame)):
        conn.sendall(frame[i:i + 1])
        time.sleep(0.3)


def _unsolicited(conn, msg):
    for i in range(50):
        reply(conn, {"id": 10_000 + i, "ok": True, "result": None})
        time.sleep(0.2)


def _huge_header(conn, msg):
    conn.sendall(struct.pack("!4sIQ", b"AML1", 2**31, 0))


def _huge_payload(conn, msg):
    hdr = b'{"msg":{"id":%d,"ok":true,"result":null},"tensors":[]}' % msg["id"]
    conn.sendall(struct.pack("!4sIQ", b"AML1", len(hdr), 2**40) + hdr)


def _bad_descriptor(conn, msg):
    hdr = (b'{"msg":{"id":%d,"ok":true,"result":{"$t":0}},"tensors":[{"dtype":"float32","shape":[0,%d],'
           b'"offset":0,"nbytes":0}]}' % (msg["id"], 2**63))
    conn.sendall(struct.pack("!4sIQ", b"AML1", len(hdr), 0) + hdr)


def _json_bomb(conn, msg):
    hdr = b'{"msg":{"id":%d,"ok":true,"result":[' % msg["id"] + b"{}," * 100_000 + b'{}]},"tensors":[]}'
    conn.sendall(struct.pack("!4sIQ", b"AML1", len(hdr), 0) + hdr)


def _silent(conn, msg):
    pass


@pytest.mark.parametrize("script,error,match", [
    (_drip, AcceleratorConnectionError, "no answer within"),
    (_silent, AcceleratorConnectionError, "no answer within"),
    (_unsolicited, ProtocolError, "unsolicited"),
    (_huge_header, ProtocolError, "header of 2147483648 bytes"),
    (_huge_payload, ProtocolError, "claims 1099511627776 payload bytes"),
    (_bad_descriptor, ProtocolError, "bad tensor shape"),
    (_json_bomb, ProtocolError, "header"),
], ids=["dripping", "silent", "unsolicited", "huge-header", "huge-payload", "bad-descriptor", "json-bomb"])
def test_misbehaving_server_fails_every_pending_request(script, error, match):
    fake = FakeServer(script)
    try:
        ex = RemoteExecutor(fake.address, timeout=2.0, verify=False)
        results: list[BaseException | None] = []

        def call():
            try:
                ex.synchronize()
                results.append(None)
            except BaseException as e:  # noqa: BLE001
                results.append(e)

        t0 = time.monotonic()
        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(BOUND_S)
        assert time.monotonic() - t0 < BOUND_S and len(results) == 3, "a request hung"
        # the request that met the fault gets its error; later ones find the connection closed for that reason
        assert any(isinstance(r, error) for r in results), results
        assert all(isinstance(r, AsymmlError) and match in str(r) for r in results), results
        ex.close()
        assert not fake.errors
    finally:
        fake.close()


# ------------------------------------------------------------------------------------------ hostile clients
def _raw(address: str) -> socket.socket:
    host, port = address[len("tcp://"):].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    return s


def _fuzz_frames(rng: random.Random):
    ops = ["hello", "release", "forward", "backward", "free", "discard", "stats", "sync", "drop_weights", "nope"]
    """Lists of frames, each list sent on a fresh connection."""
    yield [b"GET / HTTP/1.1\r\n\r\n"]
    yield [struct.pack("!4sIQ", b"AML1", 2**31, 0)]                      # header claim over the limit
    yield [struct.pack("!4sIQ", b"AML1", 10, 2**62)]                     # payload claim over the limit
    yield [struct.pack("!4sIQ", b"AML1", 900_000, 0) + b"[" * 900_000]  # nested-JSON bomb
    bomb = b'{"msg":{"id":1,"op":"sync","x":[' + b"{}," * 200_000 + b'{}]},"tensors":[]}'
    yield [struct.pack("!4sIQ", b"AML1", len(bomb), 0) + bomb]          # object-count bomb
    # a valid frame that claims 1 GiB of payload and sends 16 bytes (must not allocate 1 GiB)
    hdr = b'{"msg":{"id":2,"op":"sync"},"tensors":[]}'
    yield [struct.pack("!4sIQ", b"AML1", len(hdr), 1 << 30) + hdr + bytes(16)]
    frames = []
    for _ in range(40):
        msg = {"id": rng.choice([1, -1, "x", None, 2**70]), "op": rng.choice(ops)}
        for k in rng.sample(["hid", "key", "layer", "kind", "tensor", "program", "inputs", "hids", "outputs"], 3):
            msg[k] = rng.choice([0, -5, "s", [], {}, None, [1, "a"], {"pid": 0, "instrs": [{"out": "y"}]}, 1e308])
        try:
            bufs = encode_message(msg)
        except (TypeError, ValueError):
            continue
        data = b"".join(bytes(b) for b in bufs[:-1])
        if rng.random() < 0.3:  # corrupt a byte
            i = rng.randrange(len(data))
            data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
        frames.append(data)
    yield frames
    # a program whose padding would blow a 1x1 input up to ~1 GiB
    prog = {"pid": 7, "instrs": [{"out": "y", "op": "conv2d", "args": ["in0"], "params": ["w"],
                                  "kw": {"padding": 8000}}]}
    yield [b"".join(bytes(b) for b in encode_message({"id": 3, "op": "release", "hid": 1, "layer": "l",
                                                      "kind": "residual", "tensor": torch.ones(1, 1, 1, 1)})[:-1]),
           b"".join(bytes(b) for b in encode_message({
        "id": 4, "op": "forward", "key": 0, "program": prog, "inputs": {"in0": 1}, "params": {"w": 0},
        "weights": [[0, torch.ones(1, 1, 3, 3)]], "drop": [], "outputs": ["y"], "layer": "l",
        "keep_graph": False, "grad_params": []})[:-1])]
    # 1x1 convolution to 65536 channels: 512 KiB sent, 16 GiB out — refused as disproportionate
    amp = {"pid": 8, "instrs": [{"out": "y", "op": "conv2d", "args": ["in0"], "params": ["w"], "kw": {}}]}
    yield [b"".join(bytes(b) for b in encode_message({"id": 5, "op": "release", "hid": 1, "layer": "l",
                                                      "kind": "residual", "tensor": torch.ones(1, 1, 256, 256)})[:-1]),
           b"".join(bytes(b) for b in encode_message({
               "id": 6, "op": "forward", "key": 0, "program": amp, "inputs": {"in0": 1}, "params": {"w": 0},
               "weights": [[0, torch.ones(65536, 1, 1, 1)]], "drop": [], "outputs": ["y"], "layer": "l",
               "keep_graph": False, "grad_params": []})[:-1])]


def test_fuzzing_client_leaves_server_serving():
    server = AcceleratorServer("tcp://127.0.0.1:0", "cpu", insecure=True)
    with serving(server):
        rng = random.Random(12)
        t0 = time.monotonic()
        padding_refused = blowup_refused = False
        for group in _fuzz_frames(rng):
            sock = _raw(server.address)
            for i, frame in enumerate(group):
                try:
                    sock.sendall(frame)
                    # a short wait per frame; the forward closing a release+forward pair gets its answer in full
                    end = time.monotonic() + (8.0 if i == len(group) - 1 and len(group) == 2 else 0.1)
                    while True:  # drain whatever the server answers
                        msg = decode_message(*read_frame(sock, deadline=lambda e=end: e))
                        padding_refused |= "padding" in str(msg.get("error"))
                        blowup_refused |= "would produce" in str(msg.get("error"))
                        if "would produce" in str(msg.get("error")) or "padding" in str(msg.get("error")):
                            break
                except (OSError, ConnectionError, ProtocolError, TimeoutError):
                    pass
            sock.close()
        assert padding_refused and blowup_refused
        assert time.monotonic() - t0 < 60
        with RemoteExecutor(server.address, timeout=BOUND_S) as ex:  # the next valid client is served
            _step(ex)


def test_connection_cap_and_idle_timeout():
    server = AcceleratorServer("tcp://127.0.0.1:0", "cpu", insecure=True, max_connections=2, idle_timeout=0.5)
    with serving(server):
        a = RemoteExecutor(server.address, timeout=BOUND_S)
        b = RemoteExecutor(server.address, timeout=BOUND_S)
        with pytest.raises(AsymmlError, match="busy"):
            RemoteExecutor(server.address, timeout=BOUND_S, connect_timeout=5)
        a.close()
        b.close()
        time.sleep(0.3)
        idle = _raw(server.address)
        idle.settimeout(5)
        t0 = time.monotonic()
        assert idle.recv(1) == b""  # closed by the server after the idle timeout
        assert time.monotonic() - t0 < 5
        idle.close()
        with RemoteExecutor(server.address, timeout=BOUND_S) as ex:
            ex.synchronize()


def test_descriptor_exhaustion_does_not_stop_the_server():
    """A server with 64 descriptors and no connection cap: idle connections exhaust them (accept() fails
    with EMFILE); it must keep running and serve a client once descriptors are free again."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    code = ("import sys, torch; torch.set_num_threads(1); from asymml.executors.server import AcceleratorServer; "
            "s = AcceleratorServer('tcp://127.0.0.1:0', 'cpu', insecure=True, max_connections=1000); "
            "print(s.address, flush=True); s.serve_forever()")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=limit)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=60), "server did not start"
        address = proc.stdout.readline().strip()
        socks = []
        for _ in range(80):
            try:
                socks.append(_raw(address))
            except OSError:
                break
        time.sleep(1.0)
        assert proc.poll() is None, proc.stderr.read()
        for s in socks:
            s.close()
        time.sleep(1.0)
        with RemoteExecutor(address, timeout=BOUND_S) as ex:
            _step(ex)
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "accept() failed" in err  # descriptors really ran out


def test_insecure_rules():
    with pytest.raises(ConfigError, match="without TLS"):
        AcceleratorServer("tcp://127.0.0.1:0", "cpu")  # no TLS and no --insecure
    with pytest.raises(ConfigError, match="non-loopback"):
        AcceleratorServer("tcp://0.0.0.0:0", "cpu", insecure=True)
    with pytest.raises(ConfigError, match="unauthenticated"):
        RemoteExecutor("tcp://192.0.2.1:7777")  # refused before connecting


def test_channels_last_tensors_cross_the_wire_in_their_layout():
    """A channels-last activation is sent in NHWC byte order and arrives channels-last with the same values (a
    remote accelerator then computes on the layout a local one gets); a descriptor with any other layout, or
    NHWC on a tensor that is not 4-D, is refused before any byte is interpreted."""
    import json

    from asymml.executors.wire import PREFIX

    x = torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last)
    plain = torch.randn(3, 4)
    bufs = encode_message({"a": x, "b": plain})
    frame = bytearray(b"".join(bytes(b) for b in bufs[:-1]))
    _, hlen, _ = PREFIX.unpack_from(frame)
    pre = PREFIX.size
    header = json.loads(frame[pre:pre + hlen])
    assert header["tensors"][0].get("layout") == "nhwc" and "layout" not in header["tensors"][1]
    got = decode_message(bytes(frame[pre:pre + hlen]), bytearray(frame[pre + hlen:]))
    assert got["a"].is_contiguous(memory_format=torch.channels_last) and torch.equal(got["a"], x)
    assert torch.equal(got["b"], plain)
    for bad in ({"layout": "nchw"}, {"layout": ["nhwc"]}, {"layout": "nhwc", "shape": [2, 60]}):
        h = json.loads(frame[pre:pre + hlen])
        d = h["tensors"][0]
        d.update(bad)
        if "shape" in bad:
            d["nbytes"] = 2 * 60 * 4
        with pytest.raises(ProtocolError, match="layout"):
            decode_message(json.dumps(h).encode(), bytearray(frame[pre + hlen:]))
