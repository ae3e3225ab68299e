"""Benchmarks of routed inference: ``canet bench`` (also ``python -m canet.bench``) and the
library the scripts in ``benches/`` build on.

Measures users/s of every way to score a batch of users, for several routing mixes and batch
sizes, on one fixed model shape (N = 3000 items, L = 50, the paper's routing space, random
weights with non-trivial residual scales):

* ``supernet_dense``  -- the PyTorch supernet with every user at the largest config
  (``model.score(seqs, largest_ids)``): what serving without routing costs;
* ``masked``          -- the paper code's way: the masked path at full width for every user
  (``model.score_masked(seqs, model.one_hot(ids))``);
* ``supernet_routed`` -- the PyTorch supernet running each user's routed config
  (``model.score(seqs, ids)``, the sliced reference);
* ``<backend>``       -- ``Engine(model, backend=...).score(seqs, ids)``, users grouped by config;
* ``<backend>_largest`` -- the same engine with every user forced to the largest config.

Modules: :mod:`~canet.bench.workload` (model, inputs, routing mixes, dtypes: built here only),
:mod:`~canet.bench.timing` (the one timer, wall clock or CUDA events),
:mod:`~canet.bench.analysis` (efficiency arithmetic, targets, the dtype rule for scores),
:mod:`~canet.bench.report` (machine facts, tables, JSON / Markdown / plot writers),
:mod:`~canet.bench.measure` (the CPU run), :mod:`~canet.bench.training` (``--train``),
:mod:`~canet.bench.serving` (``--serve``: the HTTP load test) and ``__main__`` (the command
line, the only module here that parses arguments; :func:`main` imports it on first call).
"""

from __future__ import annotations

from .analysis import (
    DTYPE_ATOL,
    MAX_REL_ERROR,
    TARGETS,
    ScoreCheck,
    TargetSpec,
    case_metrics,
    check_scores,
    efficiency,
    evaluate_targets,
    ideal_speedup,
    max_relative_error,
    speedup,
)
from .measure import run
from .report import (
    Interrupted,
    error_text,
    format_table,
    format_targets,
    machine_info,
    markdown,
    on_sigterm,
    slug,
    table_rows,
    write_json_and_markdown,
    write_plots,
)
from .timing import CLOCKS, Timing, graph_of, time_call, time_interleaved, time_repeats
from .workload import (
    BASELINES,
    BATCHES,
    DEFAULT_BACKENDS,
    DEFAULT_SEED,
    DTYPES,
    MIXES,
    NUM_ITEMS,
    PAPER_FLOPS_FRACTION,
    PAPER_SMALL_RATIO,
    SEQ_LEN,
    available_backends,
    build_model,
    config_fractions,
    config_histogram,
    make_config_ids,
    make_sequences,
    method_calls,
    paper_weights,
    route_like,
)

__all__ = [
    "BASELINES",
    "BATCHES",
    "CLOCKS",
    "DEFAULT_BACKENDS",
    "DEFAULT_SEED",
    "DTYPES",
    "DTYPE_ATOL",
    "Interrupted",
    "MAX_REL_ERROR",
    "MIXES",
    "NUM_ITEMS",
    "PAPER_FLOPS_FRACTION",
    "PAPER_SMALL_RATIO",
    "SEQ_LEN",
    "ScoreCheck",
    "TARGETS",
    "TargetSpec",
    "Timing",
    "available_backends",
    "build_model",
    "case_metrics",
    "check_scores",
    "config_fractions",
    "config_histogram",
    "efficiency",
    "error_text",
    "evaluate_targets",
    "format_table",
    "format_targets",
    "graph_of",
    "ideal_speedup",
    "machine_info",
    "main",
    "make_config_ids",
    "make_sequences",
    "markdown",
    "max_relative_error",
    "method_calls",
    "on_sigterm",
    "paper_weights",
    "route_like",
    "run",
    "slug",
    "speedup",
    "table_rows",
    "time_call",
    "time_interleaved",
    "time_repeats",
    "write_json_and_markdown",
    "write_plots",
]


def main(argv: list[str] | None = None) -> int:
    """``canet bench`` (see ``canet bench --help``): the command line lives in
    ``canet.bench.__main__``, imported here on first call so that ``import canet.bench`` does
    not import argparse."""
    from .__main__ import main as _main

    return _main(argv)
