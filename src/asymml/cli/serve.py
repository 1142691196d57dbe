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
  asymml serve                                         # tcp://127.0.0.1:7777, GPU if there is one
  asymml serve --listen tcp://0.0.0.0:7777 --device cuda   # reachable from other hosts (see SECURITY below)
  asymml serve --listen unix:///tmp/asymml.sock        # same host, lowest latency (not from inside Gramine)
  asymml serve --listen tcp://127.0.0.1:0              # any free port; the chosen address is printed

The first line on stdout is "asymml serve: listening on ADDRESS (device DEV)". SIGINT/SIGTERM stop the server.
Sharing CPU cores with the client? Start both with OMP_WAIT_POLICY=passive (idle OpenMP threads otherwise spin).
SECURITY: the connection is neither encrypted nor authenticated; everything on it is, by design, what the
accelerator may see (public weights, residuals). Bind to 0.0.0.0 only on a trusted network or behind a tunnel."""


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
    try:
        server = AcceleratorServer(args.listen, args.device, max_payload=args.max_message_mib << 20)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.listen}: {e.strerror or e}") from None

    def stop(signum: int, _frame: object) -> None:
        logging.getLogger("asymml.serve").info("received %s, shutting down", signal.Signals(signum).name)
        server.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"asymml serve: listening on {server.address} (device {server.device})", flush=True)
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
