"""The ``canet`` command: a table of subcommands, one module of this package per command.

Every argparse parser of canet lives in this package (and in the benchmark's own entry point,
``canet.bench``): library modules take plain arguments and never parse a command line.

    canet train --data LOG --out RUN_DIR [--config cfg.yaml] [--key value ...]
    canet evaluate RUN_DIR --data LOG [--split test|valid] [--backend model|auto|torch|cpu]
                   [--budget B] [--max-flops F]
    canet compare RANKS_A.csv [...] --against RANKS_B.csv [...] [--metric ndcg@10]
    canet calibrate RUN_DIR --data LOG [--budgets 0.1,0.2,...] [--split valid|test]
    canet recommend RUN_DIR --input FILE -k 10 --output recs.csv [--budget B]
    canet pareto RUN_DIR --data LOG [--split test] [--budgets 0.1,0.2,...] [--against RUN2 ...]
    canet serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--max-batch-size 256] [--budget B]
    canet demo [--data LOG] [--quick]
    canet bench ...            (canet.bench.main)

Every user-caused error (bad data, config or checkpoint) ends with exit status 2 and one line
``canet: error: <message>`` on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .._version import __version__

__all__ = ["COMMANDS", "main", "build_parser"]

# name -> (module with add_arguments(parser) and run(args, extra) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("canet.cli.train", "train CANet (or one fixed sub-network) on an interaction log"),
    "evaluate": ("canet.cli.evaluate",
                 "full-ranking metrics, routing and FLOPs of a trained run"),
    "calibrate": ("canet.cli.calibrate",
                  "calibrate serve-time compute budgets of a trained run into its checkpoint"),
    "compare": ("canet.cli.compare",
                "paired comparison of two models' per-user ranks (bootstrap interval)"),
    "recommend": ("canet.cli.recommend",
                  "top-k items for histories given as a log or JSON"),
    "pareto": ("canet.cli.pareto",
               "accuracy/compute Pareto report: budgets, fixed sub-networks, random routing"),
    "serve": ("canet.cli.serve",
              "HTTP recommendation service with micro-batching (needs canet[serve])"),
    "demo": ("canet.cli.demo", "train CANet and the full-size baseline, evaluate, compare"),
}
# Subcommands that own their whole argument list (parsed by their module's main(argv)).
PASSTHROUGH: dict[str, tuple[str, str]] = {
    "bench": ("canet.cli.bench",
              "benchmarks: inference of the engine backends, or training throughput (--train)"),
}
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2, as for every bad input
        self.exit(EXIT_USAGE, f"canet: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="canet", description="CANet: one person, one model.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"canet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(
            name, help=help_text, description=help_text, allow_abbrev=False
        )
        importlib.import_module(module_name).add_arguments(command)
    for name, (_, help_text) in PASSTHROUGH.items():
        command = sub.add_parser(name, help=help_text, add_help=False)
        command.add_argument("argv", nargs=argparse.REMAINDER)
    return parser


def _run_passthrough(name: str, argv: list[str]) -> int:
    module = importlib.import_module(PASSTHROUGH[name][0])
    return int(module.main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]) and return the exit status.

    A rank of a distributed run (a process that opened a process group) does not return: it
    flushes its output and leaves at once with the status. torch's distributed C++ state can
    abort in the interpreter's teardown ("terminate called without an active exception", a
    transport thread destroyed while joinable), which would turn exit status 2 into SIGABRT."""
    status = _main(argv)
    from .. import distributed

    if distributed.started():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _main(argv: Sequence[str] | None) -> int:
    from ..distributed import ReportedElsewhere
    from ..errors import CanetError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return _run_passthrough(argv[0], argv[1:])
    try:
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as exit_request:  # --help, --version, usage errors
            return exit_request.code if isinstance(exit_request.code, int) else EXIT_USAGE
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args, extra) or 0)
    except ReportedElsewhere:  # a distributed run: another rank prints the error
        return EXIT_USAGE
    except (CanetError, ValueError) as error:  # BackendUnavailableError is a CanetError
        message = " ".join(str(error).splitlines()) or type(error).__name__
        print(f"canet: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # an unwritable --out/--output, a full disk: the user's to fix
        where = f"{error.filename}: " if error.filename else ""
        print(f"canet: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("canet: interrupted", file=sys.stderr)
        return 130

