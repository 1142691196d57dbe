"""``python -m asymml.enclave [MANIFEST_OR_TEMPLATE ...]``: check Gramine manifests (default: the shipped one)."""

from __future__ import annotations

import sys

from . import TEMPLATE, ManifestError, check_manifest


def main(argv: list[str] | None = None) -> int:
    paths = (sys.argv[1:] if argv is None else argv) or [str(TEMPLATE)]
    rc = 0
    for p in paths:
        try:
            check_manifest(p)
        except ManifestError as e:
            print(f"FAIL {e}", file=sys.stderr)
            rc = 1
        else:
            print(f"ok   {p}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
