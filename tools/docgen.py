"""What the generated docs share: write a file atomically, or check that it is current (``--check``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


def write_or_check(render: Callable[[], str], out: Path, description: str, argv: list[str] | None = None) -> int:
    """``render()`` written to ``--out`` (default ``out``) through a temporary name; with ``--check``,
    exit status 1 and a line on stderr when the file differs from what would be written."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="Exit 1 if the file is stale, write nothing.")
    parser.add_argument("--out", type=Path, default=out)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0
