"""Entry point of the ``asymml`` command. Each subcommand lives in its own module with
``add_parser(subparsers)`` and ``run(args) -> int``; errors that users can fix are printed as one clear
line (no traceback) with a non-zero exit code."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import AsymmlError

SUBCOMMANDS = ("train", "eval", "bench", "privacy", "validate", "serve", "certs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asymml",
        description="Train and run CNNs split between a trusted context (TEE) and an untrusted accelerator.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"asymml.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"asymml.cli.{name}":
                continue
            raise
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # the main job: train a real model on an offline dataset
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("asymml: interrupted", file=sys.stderr)
        return 130
    except (AsymmlError, ValueError, FileNotFoundError) as e:
        print(f"asymml {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
