"""`device-agent` command line. The agent commands arrive with issue 3; until then the command says so."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("device-agent: not implemented yet (tracked in issue 3)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
