"""``asymml serve``: the accelerator server of level 2 (SPEC §2, §6).

Run it on the machine with the GPU, outside the enclave; the trusted program connects with
``RemoteExecutor("tcp://HOST:PORT")`` (or ``unix:///PATH`` on the same host, outside Gramine). The server is
the untrusted party: it only ever receives what the client's release ledger records.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

EPILOG = """examples:
  asymml certs --out pki                               # a test CA + server/client key pairs
  asymml serve --listen tcp://0.0.0.0:7777 --device cuda \
      --tls-cert pki/server.pem --tls-key pki/server.key --tls-ca pki/ca.pem   # mutual TLS
  asymml serve --insecure                              # tcp://127.0.0.1:7777, no TLS (loopback only)
  asymml serve --insecure --listen unix:///tmp/asymml.sock   # same host, lowest latency
  asymml serve --insecure --listen tcp://127.0.0.1:0   # any free port; the chosen address is printed

The first line on stdout is "asymml serve: listening on ADDRESS (device DEV)". SIGINT/SIGTERM stop the server.
Sharing CPU cores with the client? Start both with OMP_WAIT_POLICY=passive (idle OpenMP threads otherwise spin).
SECURITY: with --tls-* both ends authenticate with certificates from the same CA and the link is encrypted;
unauthenticated peers are refused. Without TLS the server needs --insecure and only listens on loopback or a
Unix socket. Clients verify every result (Freivalds checks) whatever the link."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the accelerator server (level 2: the GPU side, outside the enclave)",
        description="Serve the accelerator: a worker that runs the residual programs of split models for "
                    "clients connecting with asymml.executors.remote.RemoteExecutor.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", default="tcp://127.0.0.1:7777", metavar="ADDRESS",
                   help="tcp://HOST:PORT or unix:///PATH (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-message-mib", type=int, default=16384, help="largest accepted message (default: %(default)s)")
    p.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate that signs the clients' certificates")
    p.add_argument("--insecure", action="store_true",
                   help="serve without TLS (no authentication, no encryption); loopback/Unix sockets only")
    p.add_argument("--max-connections", type=int, default=16, help="concurrent clients (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=3600.0,
                   help="close a connection idle this many seconds (default: %(default)s; 0 = never)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import ConfigError
    from ..executors.server import AcceleratorServer

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s asymml-serve %(levelname)s %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.max_message_mib < 1:
        raise ConfigError(f"--max-message-mib must be positive, got {args.max_message_mib}")
    from ..executors.tls import TLSConfig

    tls = TLSConfig.from_options(args.tls_cert, args.tls_key, args.tls_ca)
    if tls is not None and args.insecure:
        raise ConfigError("--insecure contradicts --tls-cert/--tls-key/--tls-ca; pass one or the other")
    if args.idle_timeout < 0:
        raise ConfigError(f"--idle-timeout must be >= 0, got {args.idle_timeout}")
    if tls is None:
        print("asymml serve: WARNING: serving WITHOUT TLS (--insecure): clients are not authenticated and "
              "traffic is not encrypted", file=sys.stderr, flush=True)
    try:
        server = AcceleratorServer(args.listen, args.device, max_payload=args.max_message_mib << 20, tls=tls,
                                   insecure=args.insecure, max_connections=args.max_connections,
                                   idle_timeout=args.idle_timeout or None)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.listen}: {e.strerror or e}") from None

    def stop(signum: int, _frame: object) -> None:
        logging.getLogger("asymml.serve").info("received %s, shutting down", signal.Signals(signum).name)
        server.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"asymml serve: listening on {server.address} (device {server.device}, "
          f"{'insecure' if tls is None else 'mutual TLS'})", flush=True)
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m asymml.cli.serve``), the same as ``asymml serve``."""
    parser = argparse.ArgumentParser(prog="asymml")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except ValueError as e:
        print(f"asymml serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
