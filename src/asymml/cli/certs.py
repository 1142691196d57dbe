"""``asymml certs``: a test CA and server/client key pairs for mutual TLS between a client and ``asymml serve``."""

from __future__ import annotations

import argparse
import sys

EPILOG = """example:
  asymml certs --out pki --host gpu-box.example --host 10.0.0.2
  asymml serve --listen tcp://0.0.0.0:7777 --tls-cert pki/server.pem --tls-key pki/server.key --tls-ca pki/ca.pem
  asymml train --device tcp://gpu-box.example:7777 --tls-cert pki/client.pem --tls-key pki/client.key --tls-ca pki/ca.pem

For tests and trial deployments: the CA key is not written, so nothing else can be signed by it later; a real
deployment uses its own PKI. Private keys are written with mode 0600."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="write a test CA and server/client key pairs for mutual TLS",
                       description="Create ca.pem, server.pem/server.key and client.pem/client.key in DIR.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write into (created if needed)")
    p.add_argument("--host", action="append", default=None, metavar="NAME",
                   help="a name or IP the server certificate is valid for (repeatable; default: localhost, "
                        "127.0.0.1, ::1)")
    p.add_argument("--days", type=int, default=30, help="validity in days (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..executors.tls import write_test_pki

    if args.days < 1:
        raise ConfigError(f"--days must be positive, got {args.days}")
    try:
        files = write_test_pki(args.out, args.host, days=args.days)
    except OSError as e:
        raise ConfigError(f"cannot write certificates into {args.out}: {e.strerror or e}") from None
    for name, path in files.items():
        print(f"asymml certs: wrote {path}" + (" (private key, 0600)" if name.endswith(".key") else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="asymml")
    add_parser(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["certs", *sys.argv[1:]])
    sys.exit(run(a))
