"""`python -m sectorfsm.statecharts [--check] [DIR]`: rewrite (or check) the committed diagrams."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .export import COMMITTED, HERE, stale_diagrams, write_diagrams


def main(argv: list[str] | None = None) -> int:
    """Write the diagrams into DIR (default: this package); `--check` only compares."""
    parser = argparse.ArgumentParser(prog="python -m sectorfsm.statecharts", description=__doc__)
    parser.add_argument("directory", nargs="?", type=Path, default=HERE)
    parser.add_argument("--check", action="store_true", help="exit 1 if a diagram is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_diagrams(args.directory)
        for name in stale:
            print(f"stale: {args.directory / name}", file=sys.stderr)
        return 1 if stale else 0
    written = write_diagrams(args.directory)
    for path in written:
        print(f"wrote {path}")
    skipped = set(COMMITTED.values()) - {p.name for p in written}
    for name in sorted(skipped):
        print(f"skipped {name}: Graphviz's `dot` is not installed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
