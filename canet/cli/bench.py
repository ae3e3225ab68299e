"""``canet bench``: the engine benchmark. Its arguments are parsed by the benchmark's own entry
point (``canet.bench``, also ``python -m canet.bench``), so this module only hands them on."""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Run ``canet bench ARGV``; returns the exit status."""
    try:
        bench = importlib.import_module("canet.bench")
    except ModuleNotFoundError as error:
        if error.name != "canet.bench":
            raise
        print("canet: error: 'bench' is not available in this install (canet.bench is missing)",
              file=sys.stderr)
        return 2
    return int(bench.main(argv) or 0)
