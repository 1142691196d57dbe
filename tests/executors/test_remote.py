"""Level 2 (SPEC §2): a split model driving a real, separate ``asymml serve`` process through RemoteExecutor."""

from __future__ import annotations

import copy
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import compare_with_reference

import asymml
from asymml.enclave import TEMPLATE, ManifestError, check_manifest
from asymml.executors.remote import (
    PROTOCOL_VERSION,
    AcceleratorConnectionError,
    RemoteExecutor,
    decode_message,
    encode_message,
    read_frame,
    send_buffers,
)
from asymml.models import get_model

TOL = 1e-4


def _serve_argv(listen: str) -> list[str]:
    from asymml.cli.main import SUBCOMMANDS

    entry = ["-m", "asymml.cli.main", "serve"] if "serve" in SUBCOMMANDS else ["-m", "asymml.cli.serve"]
    return [sys.executable, *entry, "--listen", listen, "--device", "cpu", "--threads", "1", "--log-level", "warning",
            "--insecure"]


class Server:
    """``asymml serve`` as a child process; ``address`` is the one it reports on its first stdout line."""

    def __init__(self, listen: str) -> None:
        env = dict(os.environ, OMP_WAIT_POLICY="passive")  # do not spin on the cores the client needs
        self.proc = subprocess.Popen(_serve_argv(listen), stdout=subprocess.PIPE, text=True, env=env)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=90):
            self.stop()
            pytest.fail("asymml serve did not start within 90 s")
        line = self.proc.stdout.readline().strip()
        sel.close()
        assert line.startswith("asymml serve: listening on "), line
        self.address = line.split("listening on ", 1)[1].split(" ", 1)[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """While this process waits for the server, idle OpenMP workers would spin (OMP_WAIT_POLICY=active is
    libgomp's default behaviour) and starve the server of CPU; one intra-op thread has no workers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def unix_server(tmp_path_factory):
    s = Server(f"unix://{tmp_path_factory.mktemp('serve')}/accel.sock")
    yield s
    s.stop()
    assert s.proc.returncode == 0  # SIGTERM is a clean shutdown


@pytest.fixture(scope="module")
def tcp_server():
    s = Server("tcp://127.0.0.1:0")
    assert s.address.startswith("tcp://127.0.0.1:") and not s.address.endswith(":0")
    yield s
    s.stop()


def _model(train: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    m = get_model("resnet20")
    for mod in m.modules():  # non-trivial BatchNorm statistics, so eval-mode scales differ per layer
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_var.uniform_(0.5, 2.0)
            mod.running_mean.uniform_(-0.5, 0.5)
    return m.train(train)


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("transport,train,backward", [
    ("unix", True, "protected"), ("unix", False, "paper"), ("tcp", True, "paper"), ("tcp", False, "protected"),
])
def test_remote_equals_unsplit(request, transport, train, backward):
    server = request.getfixturevalue(f"{transport}_server")
    with RemoteExecutor(server.address, timeout=60) as ex:
        e_out, e_grad, sm, _ = compare_with_reference(_model(train), _x(), executor=ex, audit=True, backward=backward)
        assert e_out <= TOL and e_grad <= TOL, (e_out, e_grad)
        kinds = {r.kind for r in ex.ledger}
        assert "input" not in kinds and "residual" in kinds
        assert ("grad_residual" if backward == "protected" else "grad") in kinds
        assert ex.device == torch.device("cpu") and repr(ex).startswith("RemoteExecutor(")


def _steps(ex, train: bool, steps: int) -> tuple[list, list[torch.Tensor]]:
    m = _model(train)
    sm = asymml.split(m, executor=ex, audit=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    outs = []
    for _ in range(steps):
        out = sm(_x())
        outs.append(out.detach())
        if train:
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
    return list(ex.ledger), outs


def test_ledger_identical_to_local(unix_server):
    """Same releases (layer, kind, shape and values) as LocalExecutor; weights resent only after they change."""
    local, out_l = _steps(asymml.LocalExecutor("cpu"), True, 2)
    with RemoteExecutor(unix_server.address) as ex:
        remote, out_r = _steps(ex, True, 2)
        n = len(ex.ledger)
        with torch.no_grad():
            asymml.split(_model(True), executor=ex, audit=True)(_x())
            k = len(ex.ledger)
            sm = asymml.split(_model(True), executor=ex, audit=True)
            sm(_x())  # another model (new tensors, maybe at freed tensors' ids): released again
            k2 = len(ex.ledger)
            sm(_x())  # unchanged weights are not released again
        weights = [[r for r in ex.ledger[a:b] if r.kind == "weight"] for a, b in ((n, k), (k, k2), (k2, None))]
        assert weights[0] and len(weights[1]) == len(weights[0]) and not weights[2]
    assert [(r.layer, r.kind, r.shape) for r in remote] == [(r.layer, r.kind, r.shape) for r in local]
    # (the wire keeps channels-last tensors channels-last: the server computes on the layout the local
    # executor gets, so the second step's releases, which derive from updated weights, agree too)
    for a, b in zip(remote, local):
        torch.testing.assert_close(a.tensor, b.tensor, rtol=1e-5, atol=1e-6)
    for a, b in zip(out_r, out_l):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    first = sum(r.kind == "weight" for r in remote[: len(remote) // 2])
    assert first > 0 and sum(r.kind == "weight" for r in remote) == 2 * first  # again after the optimizer step

    # eval mode: BatchNorm scales are computed afresh each forward and released each time. (LocalExecutor
    # caches weights by id(), so a fresh scale that reuses a freed tensor's id can be skipped there; compare
    # the private-derived releases exactly and the weights as sets.)
    local, _ = _steps(asymml.LocalExecutor("cpu"), False, 1)
    with RemoteExecutor(unix_server.address) as ex:
        remote, _ = _steps(ex, False, 1)
    private = [[(r.layer, r.kind, r.shape) for r in led if r.kind != "weight"] for led in (remote, local)]
    assert private[0] == private[1]
    w_remote = [(r.layer, r.shape) for r in remote if r.kind == "weight"]
    assert {(r.layer, r.shape) for r in local if r.kind == "weight"} <= set(w_remote)
    assert len(w_remote) == len(set(w_remote))


def test_eval_after_training_sees_new_running_statistics(unix_server):
    """Train-mode BatchNorm updates its running statistics in place without bumping their version: the
    next eval forward must still reach the server with the new values (verified, and equal to unsplit)."""
    m = _model(True)
    ref = copy.deepcopy(m)
    with RemoteExecutor(unix_server.address) as ex:
        assert ex.verify
        sm = asymml.split(m, executor=ex, placement="split")
        for _ in range(2):
            for model in (sm, ref):  # a train-mode forward moves the running statistics
                model.train()
                with torch.no_grad():
                    model(_x(4))
                model.eval()
            with torch.no_grad():
                torch.testing.assert_close(sm(_x()), ref(_x()), rtol=1e-4, atol=1e-5)


def test_repeated_eval_forwards_and_profile(unix_server):
    """Eval-mode BatchNorm scales are fresh tensors every forward; each must reach the server with its value."""
    m = _model(False)
    ref = copy.deepcopy(m)
    with RemoteExecutor(unix_server.address) as ex:
        sm = asymml.split(m, executor=ex)
        with torch.no_grad():
            for step in range(3):
                if step == 2:
                    sm.set_profiling(True)
                torch.testing.assert_close(sm(_x()), ref(_x()), rtol=1e-4, atol=1e-5)
                for model in (m, ref):  # new BatchNorm values: every scale changes
                    for mod in model.modules():
                        if isinstance(mod, torch.nn.BatchNorm2d):
                            mod.weight.mul_(1.1)
        ex.synchronize()
        prof = sm.profile()
        assert any(lp.accelerator_flops > 0 for lp in prof.layers)
        with pytest.raises(NotImplementedError, match="plain"):
            asymml.split(m, mode="plain", executor=ex)(_x())


# ------------------------------------------------------------------------------------------ robustness
def _raw(address: str) -> socket.socket:
    path = address[len("unix://"):]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s


def _ask(sock: socket.socket, msg: dict) -> dict:
    send_buffers(sock, encode_message(msg))
    return decode_message(*read_frame(sock))


def test_malformed_messages_get_error_replies(unix_server):
    s = _raw(unix_server.address)
    header = b"{not json"
    s.sendall(struct.pack("!4sIQ", b"AML1", len(header), 0) + header)
    reply = decode_message(*read_frame(s))
    assert reply["ok"] is False and "JSON" in reply["error"]
    assert _ask(s, {"id": 1, "op": "rm -rf"})["error"].startswith("unknown operation")
    assert "integer" in _ask(s, {"op": "hello"})["error"]
    bad_prog = {"id": 2, "op": "forward", "key": 0, "program": {"pid": 0, "instrs": [
        {"out": "y", "op": "__import__", "args": ["x"], "params": [], "kw": {}}]},
        "inputs": {}, "params": {}, "weights": [], "drop": [], "outputs": ["y"], "layer": "l",
        "keep_graph": False, "grad_params": []}
    assert "unknown accelerator op" in _ask(s, bad_prog)["error"]
    r = _ask(s, {"id": 3, "op": "backward", "key": 99, "grad_outputs": {"y": 12345}, "input_grads": [],
                 "param_grads": [], "value_grads": [], "values": []})
    assert r["ok"] is False and "unknown tensor handle" in r["error"]
    hdr = json.dumps({"msg": {"id": 4, "op": "release", "hid": 0, "layer": "l", "kind": "residual", "tensor": {"$t": 0}},
                      "tensors": [{"dtype": "float32", "shape": [1000], "offset": 0, "nbytes": 4000}]}).encode()
    s.sendall(struct.pack("!4sIQ", b"AML1", len(hdr), 16) + hdr + bytes(16))  # claims 4000 bytes, has 16
    assert "outside the payload" in decode_message(*read_frame(s))["error"]
    assert _ask(s, {"id": 5, "op": "hello", "version": PROTOCOL_VERSION})["ok"] is True  # the connection survived all that
    s.close()

    s = _raw(unix_server.address)  # a broken frame: answered once, then the connection is closed
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = decode_message(*read_frame(s))
    assert reply["ok"] is False and "magic" in reply["error"]
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:  # AF_UNIX reports unread data at close as a reset
        pass
    s.close()
    assert unix_server.proc.poll() is None
    with RemoteExecutor(unix_server.address) as ex:  # and the server still serves
        ex.synchronize()


def test_connect_errors():
    with pytest.raises(AcceleratorConnectionError, match="cannot connect"):
        RemoteExecutor("unix:///nonexistent/asymml.sock", connect_timeout=2)
    with pytest.raises(asymml.ConfigError, match="tcp://HOST:PORT"):
        RemoteExecutor("http://example.org")
    with socket.socket() as mute:  # accepts, never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(1)
        t0 = time.monotonic()
        with pytest.raises(AcceleratorConnectionError, match="handshake"):
            RemoteExecutor(f"tcp://127.0.0.1:{mute.getsockname()[1]}", connect_timeout=1)
        assert time.monotonic() - t0 < 10


def test_in_process_server_shutdown(tmp_path):
    from asymml.executors.server import AcceleratorServer

    path = tmp_path / "inproc.sock"
    server = AcceleratorServer(f"unix://{path}", "cpu", insecure=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    ex = RemoteExecutor(server.address)
    assert ex.server_info["device"] == "cpu" and ex.stats() == {}
    ex.close()
    ex.close()  # idempotent
    server.shutdown()
    t.join(timeout=10)
    assert not t.is_alive() and not path.exists()
    with pytest.raises(OSError, match="not a socket"):
        path.write_text("x")
        AcceleratorServer(f"unix://{path}", "cpu", insecure=True)


# ------------------------------------------------------------------------------------------ Gramine manifest
def test_manifest_template_checks():
    doc = check_manifest(TEMPLATE)
    assert doc["sgx"]["remote_attestation"] == "dcap"
    assert any(m.get("type") == "encrypted" for m in doc["fs"]["mounts"])


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace('  { type = "tmpfs", path = "/tmp" },\n]', '  { type = "tmpfs", path = "/tmp" },\n'), "TOML"),
    (lambda t: t.replace('sgx.remote_attestation = "dcap"', 'sgx.remote_attestation = "none"'), "dcap"),
    (lambda t: t.replace('type = "encrypted"', 'type = "chroot"'), "encrypted mount"),
    (lambda t: t + '\nfs.insecure__keys.default = "ffeeddccbbaa99887766554433221100"\n', "insecure__keys"),
    (lambda t: t.replace("sgx.max_threads = {{ max_threads | default(64) }}", "sgx.max_threads = {{ max_threads }}"),
     "TOML"),
    (lambda t: t + "\nloader.insecure__use_cmdline_argv = true\n", "argv"),
])
def test_broken_manifest_fails(tmp_path: Path, edit, message):
    broken = tmp_path / "broken.manifest.template"
    broken.write_text(edit(TEMPLATE.read_text()))
    with pytest.raises(ManifestError, match=message):
        check_manifest(broken)


# ------------------------------------------------------------------------------------------ server failure
def test_server_hang_and_death_raise_connection_errors(tcp_server):
    """Runs last: it stops, then kills, the module's TCP server."""
    server = tcp_server
    try:
        m = _model(True)
        x = _x()
        with RemoteExecutor(server.address, timeout=3.0) as ex:
            sm = asymml.split(m, executor=ex)
            sm(x).sum().backward()
            server.proc.send_signal(signal.SIGSTOP)  # hung: no answer
            t0 = time.monotonic()
            with pytest.raises(ConnectionError, match="no answer|stalled"):
                sm(x)
            assert time.monotonic() - t0 < 15
            with pytest.raises(AcceleratorConnectionError):
                ex.release(x, layer="input", kind="residual")
        server.proc.send_signal(signal.SIGCONT)

        with RemoteExecutor(server.address, timeout=30) as ex:
            sm = asymml.split(m, executor=ex)
            sm(x).sum().backward()
            server.proc.kill()  # died mid-run
            server.proc.wait()
            t0 = time.monotonic()
            with pytest.raises(ConnectionError):
                sm(x).sum().backward()
            assert time.monotonic() - t0 < 10
    finally:
        server.stop()
