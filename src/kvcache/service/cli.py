"""The `kvcache` command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kvcache` script."""
    del argv
    print("kvcache: not yet implemented", file=sys.stderr)
    return 2
