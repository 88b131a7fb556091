"""`fleet-server` command line. The server is not built yet (issue 4); the command says so honestly."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("fleet-server: not implemented yet (tracked in issue 4)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
