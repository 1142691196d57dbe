"""Mutual TLS between RemoteExecutor and the accelerator server (issue 12, item 2), loopback only."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from hostile_util import batch, serving, split_all, tiny

from asymml.cli.main import main as cli_main
from asymml.errors import AcceleratorConnectionError, ConfigError
from asymml.executors import make_executor
from asymml.executors.remote import RemoteExecutor
from asymml.executors.server import AcceleratorServer
from asymml.executors.tls import TLSConfig, write_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    assert cli_main(["certs", "--out", str(root / "a")]) == 0  # the command users run
    write_test_pki(root / "b")  # a second, unrelated CA
    return root


def _creds(d, role):
    return {"tls_cert": str(d / f"{role}.pem"), "tls_key": str(d / f"{role}.key"), "tls_ca": str(d / "ca.pem")}


@pytest.fixture(scope="module")
def tls_server(pki):
    a = pki / "a"
    server = AcceleratorServer("tcp://127.0.0.1:0", "cpu",
                               tls=TLSConfig(str(a / "server.pem"), str(a / "server.key"), str(a / "ca.pem")),
                               handshake_timeout=5.0)
    with serving(server):
        yield server


def test_keys_are_private(pki):
    for role in ("server", "client"):
        assert os.stat(pki / "a" / f"{role}.key").st_mode & 0o077 == 0


def test_mutual_tls_trains(pki, tls_server):
    torch.set_num_threads(1)
    with make_executor(tls_server.address, **_creds(pki / "a", "client"), timeout=30) as ex:
        assert isinstance(ex, RemoteExecutor) and ex.tls is not None and ex.verify
        sm = split_all(tiny(), executor=ex)
        sm(batch()).square().mean().backward()
        assert ex.verifier.stats()["failures"] == 0


def _hello_without_client_cert(address: str, ca: str) -> None:
    """A TLS client that trusts the server but presents no certificate, then says hello."""
    import socket
    import ssl

    from asymml.executors.wire import PROTOCOL_VERSION, Transport, decode_message, encode_message, read_frame, send_buffers

    ctx = ssl.create_default_context(cafile=ca)
    host, port = address[len("tcp://"):].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    try:
        t = Transport.wrap(sock, ctx, server_side=False, server_hostname=host, deadline=time.monotonic() + 5)
        send_buffers(t, encode_message({"id": 1, "op": "hello", "version": PROTOCOL_VERSION}))
        end = time.monotonic() + 5
        decode_message(*read_frame(t, deadline=lambda: end))
    finally:
        sock.close()


@pytest.mark.parametrize("who", ["plain client", "no client certificate", "client certificate from another CA",
                                 "server from another CA"])
def test_unauthenticated_peers_are_refused(pki, tls_server, who):
    import ssl

    t0 = time.monotonic()
    a, b = pki / "a", pki / "b"
    if who == "plain client":  # no TLS at all
        with pytest.raises(AcceleratorConnectionError):
            RemoteExecutor(tls_server.address, timeout=5, connect_timeout=5)
    elif who == "no client certificate":  # TLS that trusts the server, but no client certificate
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _hello_without_client_cert(tls_server.address, str(a / "ca.pem"))
    elif who == "client certificate from another CA":  # trusts the server; its own certificate is from CA b
        creds = {"tls_cert": str(b / "client.pem"), "tls_key": str(b / "client.key"), "tls_ca": str(a / "ca.pem")}
        with pytest.raises(AcceleratorConnectionError):
            with RemoteExecutor(tls_server.address, **creds, timeout=5, connect_timeout=5) as ex:
                ex.synchronize()
    else:  # our client trusts CA b only: the server's certificate (CA a) is refused
        creds = _creds(a, "client")
        creds["tls_ca"] = str(b / "ca.pem")
        with pytest.raises(AcceleratorConnectionError, match="TLS|certificate"):
            RemoteExecutor(tls_server.address, **creds, timeout=5, connect_timeout=5)
    assert time.monotonic() - t0 < 15
    with make_executor(tls_server.address, **_creds(a, "client")) as ex:  # still serving
        ex.synchronize()


def test_option_errors(pki):
    with pytest.raises(ConfigError, match="all three"):
        TLSConfig.from_options(pki / "a" / "client.pem", None, None)
    with pytest.raises(ConfigError, match="no such file"):
        TLSConfig.from_options("/nonexistent.pem", pki / "a" / "client.key", pki / "a" / "ca.pem")
    with pytest.raises(ConfigError, match="remote accelerator"):
        make_executor("cpu", **_creds(pki / "a", "client"))


def test_serve_cli_refuses_insecure_on_non_loopback(capsys):
    assert cli_main(["serve", "--insecure", "--listen", "tcp://0.0.0.0:0", "--device", "cpu"]) == 2
    assert "non-loopback" in capsys.readouterr().err
    assert cli_main(["serve", "--listen", "tcp://127.0.0.1:0", "--device", "cpu"]) == 2
    assert "--insecure" in capsys.readouterr().err


def test_serve_cli_with_tls(pki):
    a = pki / "a"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    proc = subprocess.Popen([sys.executable, "-m", "asymml.cli.main", "serve", "--listen", "tcp://127.0.0.1:0",
                             "--device", "cpu", "--threads", "1", "--tls-cert", str(a / "server.pem"),
                             "--tls-key", str(a / "server.key"), "--tls-ca", str(a / "ca.pem")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "mutual TLS" in line, line
        address = line.split("listening on ", 1)[1].split(" ", 1)[0]
        with make_executor(address, **_creds(a, "client")) as ex:
            ex.synchronize()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
