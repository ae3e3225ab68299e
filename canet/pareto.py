"""The accuracy/compute Pareto report of a trained CANet run (``canet pareto``).

On the SAME users of one split, every evaluation pairing its per-user ranks with the others:

* CANet at each serve-time budget (penalty from the run's calibration table,
  :mod:`canet.budget`): NDCG@10, recall@10, the FLOPs fraction with the router's cost excluded
  and included, the routing histogram;
* every fixed sub-network of the same supernet (one evaluation per config);
* random routing with each budget's histogram (the budget's choices dealt to the users in a
  seeded random order, ``shuffles`` times; same FLOPs as the budget);
* optionally other runs (``against``: separately trained fixed configs, the full-size model,
  another CANet), each at its own FLOPs.

FLOPs fractions are per user, over the largest sub-network of THIS run (router excluded, and
with the router's cost ``canet.flops.flops_router`` added where a router runs: CANet at a
budget and a routed ``against`` run; random routing and fixed sub-networks run none).

For each budget the report compares CANet(b) with (1) the best fixed sub-network whose FLOPs
fraction is no more than CANet(b)'s with its router, (2) random routing with the same
histogram, and (3) each ``against`` run (marked whether it costs no more). The best fixed
sub-network is chosen by NDCG@10 on the evaluated split itself: that choice favours the fixed
sub-networks (it picks the winner with hindsight, on the very users of the comparison), so it
is the conservative comparison for routing. Each comparison is the paired difference
CANet(b) - other of per-user NDCG@10 (:func:`canet.metrics.paired_difference`: 95% paired
bootstrap over users, fixed seed; the shuffles of random routing are averaged per user), and
one verdict rule holds for every comparison (:func:`verdict`): "beats" iff the interval's low
end is above 0, "worse" iff its high end is below 0, else "no difference shown".

:func:`pareto_report` returns a JSON-able dict; :func:`write_report` writes ``pareto.json``,
``pareto.md`` and, when matplotlib is importable, ``pareto.png`` (all atomically).
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ._io import write_bytes_atomic, write_text_atomic
from .budget import (
    BudgetError,
    BudgetTable,
    RoutingPenalty,
    check_achievable,
    distinct_budgets,
)
from .data import SequenceData
from .engine import Engine
from .errors import CanetError
from .evaluate import evaluate, format_histogram
from .metrics import paired_difference
from .model import CANet

__all__ = [
    "AgainstRun",
    "REPORT_VERSION",
    "check_budgets",
    "pareto_report",
    "render_markdown",
    "verdict",
    "write_report",
]

REPORT_VERSION = 1
METRIC = "ndcg@10"
RESAMPLES = 10_000
# A fixed sub-network "costs no more" than CANet(b) up to float rounding of the two means.
FLOPS_TOLERANCE = 1e-9
SELECTION = (
    "best fixed sub-network: the highest NDCG@10 on the evaluated split itself among those whose "
    "FLOPs fraction is no more than CANet's at the budget (router included); choosing on the "
    "same users favours the fixed sub-networks, so this is the conservative comparison for "
    "routing"
)
VERDICT_RULE = (
    "one rule for every comparison: 'beats' iff the 95% paired bootstrap interval of "
    "CANet(b) - other is above 0 (low > 0), 'worse' iff below 0 (high < 0), else "
    "'no difference shown'"
)

Log = Callable[[str], None]


class AgainstRun(NamedTuple):
    """Another trained run to place on the curve: ``fixed_config_id`` None routes it with its
    own router (argmax); ``data`` is the split read with its own dataset options (None: the
    report's data), which must hold the same users and targets."""

    name: str
    model: CANet
    fixed_config_id: int | None = None
    data: SequenceData | None = None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def verdict(low: float, high: float) -> str:
    """The one verdict rule of every comparison, from the interval of CANet(b) - other."""
    if low > 0:
        return "beats"
    if high < 0:
        return "worse"
    return "no difference shown"


def check_budgets(values: Sequence[object], table: BudgetTable) -> list[float]:
    """``values`` as budgets, in increasing order: each a number in (0, 1], none twice, none
    below the table's smallest achievable budget. BudgetError (one line) otherwise."""
    if not values:
        raise BudgetError("no budgets to evaluate: give at least one number in (0, 1]")
    budgets = sorted(distinct_budgets(values))
    for budget in budgets:
        check_achievable(budget, table.smallest_fraction)
    return budgets


def pareto_report(
    model: CANet,
    data: SequenceData,
    table: BudgetTable,
    *,
    split: str = "test",
    budgets: Sequence[object] | None = None,
    shuffles: int = 3,
    against: Sequence[AgainstRun | tuple] = (),
    backend: str = "auto",
    batch_size: int = 256,
    seed: int = 0,
    ks: Sequence[int] = (5, 10, 20),
    exclude_history: bool = True,
    run: dict[str, Any] | None = None,
    log: Log | None = _stderr,
) -> dict[str, Any]:
    """The Pareto report of ``model`` on ``split`` of ``data`` (see the module docstring), as a
    JSON-able dict.

    ``budgets`` (None: the table's) are checked by :func:`check_budgets`; each gets the penalty
    ``table.penalty(b)``. ``shuffles`` random-routing evaluations per budget use seeds
    ``seed .. seed + shuffles - 1``; the bootstrap uses ``seed``. ``against``: AgainstRun (or
    ``(name, model, fixed_config_id[, data])``) entries. ``backend``: "model" (``model.score``)
    or an Engine backend. ``run``: caller's description of the run, stored as is. ``log``: one
    progress line per evaluation (default: stderr; None: silent).

    The best fixed sub-network of a budget is chosen by NDCG@10 on ``split`` itself: that
    favours the fixed sub-networks, so it is the conservative comparison for routing.
    """
    if model.space.n_configs < 2:
        raise CanetError("the model's routing space has one config: nothing to route")
    if isinstance(shuffles, bool) or not isinstance(shuffles, int) or shuffles < 1:
        raise CanetError(f"shuffles must be an int >= 1, got {shuffles!r}")
    if 10 not in ks:
        raise CanetError(f"ks must contain 10 (the report compares NDCG@10), got {list(ks)}")
    budgets = check_budgets(table.budgets if budgets is None else budgets, table)
    against = [AgainstRun(*entry) for entry in against]
    names = [entry.name for entry in against]
    if len(set(names)) != len(names):
        raise CanetError(f"against runs need distinct names, got {names}")
    for entry in against:  # before minutes of evaluation: the pairing needs the same users
        if entry.data is not None and entry.data is not data:
            _check_same_targets(entry.name, entry.data, data, split)
    space = model.space
    penalties = [table.penalty(budget) for budget in budgets]
    # Budgets at or above the router's own cost share lambda 0 (and interpolation can repeat a
    # lambda): their routing is identical, so each distinct penalty is evaluated once.
    distinct = len({(p.lam, p.max_flops) for p in penalties})
    total = distinct * (1 + shuffles) + space.n_configs + len(against)
    done = 0
    say = log or (lambda message: None)

    def run_one(what: str, target: CANet, on: SequenceData, scorer: dict[str, Any],
                **options: Any) -> dict[str, Any]:
        nonlocal done
        started = time.perf_counter()
        result = evaluate(target, on, split, ks=tuple(ks), exclude_history=exclude_history,
                          batch_size=batch_size, per_user=True, **scorer, **options)
        done += 1
        say(f"pareto: {done}/{total} {what}: NDCG@10 {result['metrics'][METRIC]:.4f}, FLOPs "
            f"{result['flops']['fraction_of_largest']:.3f} of the largest "
            f"({time.perf_counter() - started:.1f} s)")
        return result

    say(f"pareto: {total} evaluations on {split} ({distinct} distinct budget routings x "
        f"{1 + shuffles}, {space.n_configs} fixed configs, {len(against)} other runs)")
    largest = None
    budget_rows, random_rows, budget_ranks, random_ranks = [], [], [], []
    num_users = None
    # (lam, max_flops) -> (CANet's result and ranks, the shuffles' results and ranks)
    evaluated: dict[tuple[float, float | None], tuple[Any, Any, list[Any], list[Any]]] = {}
    for budget, penalty in zip(budgets, penalties, strict=True):
        key = (penalty.lam, penalty.max_flops)
        if key in evaluated:
            say(f"pareto: CANet at budget {budget:g} routes as a smaller budget (lambda "
                f"{penalty.lam:.4g}): its evaluations are reused")
        else:
            scorer = _scorer(model, backend, penalty)
            result = run_one(f"CANet at budget {budget:g} (lambda {penalty.lam:.4g})", model,
                             data, scorer)
            ranks = result.pop("per_user")
            shuffled = [
                run_one(f"random routing at budget {budget:g}, shuffle {s + 1}/{shuffles}",
                        model, data, scorer, shuffle_routing_seed=seed + s)
                for s in range(shuffles)
            ]
            evaluated[key] = (result, ranks, shuffled,
                              [r.pop("per_user")["ranks"] for r in shuffled])
        result, per_user, shuffled, shuffled_ranks = evaluated[key]
        if largest is None:
            largest = result["flops"]["largest_per_user"]
            num_users = len(per_user["users"])
        budget_ranks.append(per_user["ranks"])
        budget_rows.append({"budget": budget, "lam": penalty.lam, **_row(result, largest)})
        random_ranks.append(shuffled_ranks)
        random_rows.append(_random_row(budget, shuffled, largest, seed))
    assert largest is not None and num_users is not None

    fixed_rows, fixed_ranks = [], []
    scorer = _scorer(model, backend, None)
    for config_id, config in enumerate(space.configs):
        result = run_one(f"fixed config {config_id} ({config.depth}x{config.hidden}x"
                         f"{config.emb})", model, data, scorer, fixed_config_id=config_id)
        fixed_ranks.append(result.pop("per_user")["ranks"])
        fixed_rows.append({"config_id": config_id, "depth": config.depth,
                           "hidden": config.hidden, "emb": config.emb, **_row(result, largest)})

    against_rows, against_ranks = [], []
    for entry in against:
        on = entry.data if entry.data is not None else data
        what = (f"{entry.name} (fixed config {entry.fixed_config_id})"
                if entry.fixed_config_id is not None else f"{entry.name} (routed)")
        result = run_one(what, entry.model, on, _scorer(entry.model, backend, None),
                         fixed_config_id=entry.fixed_config_id)
        against_ranks.append(result.pop("per_user")["ranks"])
        against_rows.append({"name": entry.name, "fixed_config_id": entry.fixed_config_id,
                             **_row(result, largest)})

    say(f"pareto: paired comparisons ({RESAMPLES} bootstrap resamples each)")
    comparisons = []
    for index, row in enumerate(budget_rows):
        canet_ranks = budget_ranks[index]
        ceiling = row["flops_fraction_with_router"] + FLOPS_TOLERANCE
        eligible = [f for f in fixed_rows if f["flops_fraction"] <= ceiling]
        if eligible:
            best = max(eligible, key=lambda f: (f[METRIC], -f["flops_fraction"],
                                                -f["config_id"]))
            comparisons.append(_compare(
                row, "best fixed", f"fixed config {best['config_id']}", best,
                canet_ranks, fixed_ranks[best["config_id"]], seed))
        else:
            comparisons.append({
                "budget": row["budget"], "kind": "best fixed", "other": None,
                "other_flops_fraction": None, "no_more_flops": None, "verdict": None,
                "note": "no fixed sub-network costs no more than CANet at this budget",
            })
        comparisons.append(_compare(
            row, "random routing",
            f"random routing ({shuffles} shuffle{'' if shuffles == 1 else 's'})",
            random_rows[index], canet_ranks, random_ranks[index], seed))
        for other, ranks in zip(against_rows, against_ranks, strict=True):
            comparisons.append(_compare(row, "against", other["name"], other, canet_ranks,
                                        ranks, seed))

    return {
        "version": REPORT_VERSION,
        "run": dict(run or {}),
        "model": {
            "num_items": model.num_items, "max_len": model.max_len,
            "n_configs": space.n_configs, "configs": [[c.depth, c.hidden, c.emb]
                                                      for c in space.configs],
            "router_dim": model.arch["router_dim"],
        },
        "calibration": {"split": table.split, "num_users": table.num_users,
                        "smallest_fraction": table.smallest_fraction,
                        "budgets": table.budgets},
        "split": split,
        "num_users": num_users,
        "backend": backend,
        "evaluations": done,
        "protocol": _protocol(ks, exclude_history, shuffles, seed),
        "budgets": budget_rows,
        "fixed": fixed_rows,
        "random": random_rows,
        "against": against_rows,
        "comparisons": comparisons,
    }


def _check_same_targets(name: str, other: SequenceData, data: SequenceData, split: str) -> None:
    """CanetError unless ``other`` has the same ``split`` users with the same targets as
    ``data`` (ascending user order, as every evaluation returns them)."""
    def targets(of: SequenceData) -> np.ndarray:
        return np.concatenate([t.numpy() for _, _, t in of.eval_batches(split, 4096)])

    if not (np.array_equal(other.eval_users(split), data.eval_users(split))
            and np.array_equal(targets(other), targets(data))):
        raise CanetError(
            f"{name}: its data has other {split} users or targets than the run's; compare runs "
            "trained on the same log"
        )


def _scorer(model: CANet, backend: str, penalty: RoutingPenalty | None) -> dict[str, Any]:
    """evaluate()'s keywords for scoring ``model`` with ``penalty``: one Engine per setting, not
    one per evaluation (it copies the weights into its backend)."""
    if backend == "model":
        return {"backend": "model", "penalty": penalty}
    return {"engine": Engine(model, backend=backend, penalty=penalty)}


def _row(result: dict[str, Any], largest: float) -> dict[str, Any]:
    """A table row from one evaluation; fractions over ``largest`` (THIS run's largest
    sub-network's FLOPs per user), so other runs land on the same axis."""
    flops = result["flops"]
    return {
        "flops_fraction": flops["mean_per_user"] / largest,
        "flops_fraction_with_router": (flops["mean_per_user"] + flops["router_per_user"])
        / largest,
        METRIC: result["metrics"][METRIC],
        "recall@10": result["metrics"]["recall@10"],
        "metrics": result["metrics"],
        "standard_errors": result["standard_errors"],
        "histogram": result["routing"]["histogram"],
    }


def _random_row(budget: float, shuffled: list[dict[str, Any]], largest: float,
                seed: int) -> dict[str, Any]:
    """Random routing at ``budget``: metrics averaged over the shuffles (same histogram and
    FLOPs in each)."""
    metrics = {name: float(np.mean([r["metrics"][name] for r in shuffled]))
               for name in shuffled[0]["metrics"]}
    row = _row(shuffled[0], largest)
    row.update({METRIC: metrics[METRIC], "recall@10": metrics["recall@10"], "metrics": metrics,
                "per_shuffle": {METRIC: [r["metrics"][METRIC] for r in shuffled]},
                "seeds": [seed + s for s in range(len(shuffled))]})
    del row["standard_errors"]  # of one shuffle; the spread over shuffles is per_shuffle
    return {"budget": budget, "shuffles": len(shuffled), **row}


def _compare(row: dict[str, Any], kind: str, name: str, other: dict[str, Any],
             canet_ranks: np.ndarray, other_ranks: np.ndarray | list[np.ndarray],
             seed: int) -> dict[str, Any]:
    """CANet at ``row``'s budget minus ``other``, paired over the same users."""
    result = paired_difference(canet_ranks, other_ranks, METRIC, resamples=RESAMPLES, seed=seed)
    other_fraction = other["flops_fraction_with_router"]
    return {
        "budget": row["budget"],
        "kind": kind,
        "other": name,
        "canet_flops_fraction": row["flops_fraction_with_router"],
        "other_flops_fraction": other_fraction,
        "no_more_flops": other_fraction <= row["flops_fraction_with_router"] + FLOPS_TOLERANCE,
        "metric": METRIC,
        **result,
        "verdict": verdict(result["low"], result["high"]),
    }


def _protocol(ks: Sequence[int], exclude_history: bool, shuffles: int, seed: int) -> dict:
    return {
        "metrics": f"full ranking over all items, leave-one-out, ks {list(ks)}, input items "
        + ("excluded" if exclude_history else "kept"),
        "flops": "per user, over the largest sub-network of this run; 'with router' adds the "
        "router's cost where a router runs (CANet at a budget, routed other runs)",
        "random_routing": f"each budget's routing dealt to the users in a random order, "
        f"{shuffles} shuffles (seeds {seed}..{seed + shuffles - 1}), metrics averaged",
        "selection": SELECTION,
        "interval": f"95% paired bootstrap over users of CANet(b) - other, {RESAMPLES} "
        f"resamples, seed {seed}",
        "verdict": VERDICT_RULE,
    }


# -- writers -------------------------------------------------------------------------------------
def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one table per section, the comparisons with their intervals,
    the protocol and the command line that made it (``report["command"]`` when set)."""
    run = report["run"]
    title = run.get("path", "a CANet run")
    lines = [f"# Pareto report: {title}", ""]
    if report.get("command"):
        lines += ["```bash", report["command"], "```", ""]
    lines += [
        f"Split `{report['split']}`, {report['num_users']} users (the same users in every "
        f"row), backend `{report['backend']}`, {report['evaluations']} evaluations. Budgets "
        f"calibrated on {report['calibration']['num_users']} `{report['calibration']['split']}` "
        f"users; the smallest achievable budget is "
        f"{report['calibration']['smallest_fraction']:.4f}. FLOPs: {report['protocol']['flops']}.",
        "",
        "## CANet at each budget",
        "",
        *_table(
            ["budget", "lambda", "FLOPs", "FLOPs with router", "NDCG@10 (s.e.)", "recall@10",
             "routing"],
            [[f"{r['budget']:g}", f"{r['lam']:.4g}", _number(r["flops_fraction"]),
              _number(r["flops_fraction_with_router"]),
              f"{r[METRIC]:.4f} ({r['standard_errors'][METRIC]:.4f})",
              _number(r["recall@10"]), format_histogram(r["histogram"], top=4)]
             for r in report["budgets"]],
        ),
        "",
        "## Fixed sub-networks of the same supernet",
        "",
        *_table(
            ["config", "depth", "hidden", "emb", "FLOPs", "NDCG@10 (s.e.)", "recall@10"],
            [[r["config_id"], r["depth"], r["hidden"], r["emb"], _number(r["flops_fraction"]),
              f"{r[METRIC]:.4f} ({r['standard_errors'][METRIC]:.4f})", _number(r["recall@10"])]
             for r in report["fixed"]],
        ),
        "",
        "## Random routing with each budget's histogram",
        "",
        f"{report['protocol']['random_routing']}.",
        "",
        *_table(
            ["budget", "shuffles", "FLOPs", "NDCG@10 (mean)", "NDCG@10 per shuffle",
             "recall@10 (mean)"],
            [[f"{r['budget']:g}", r["shuffles"], _number(r["flops_fraction"]),
              _number(r[METRIC]), ", ".join(f"{v:.4f}" for v in r["per_shuffle"][METRIC]),
              _number(r["recall@10"])]
             for r in report["random"]],
        ),
        "",
    ]
    if report["against"]:
        lines += [
            "## Other runs",
            "",
            *_table(
                ["run", "routing", "FLOPs", "FLOPs with router", "NDCG@10 (s.e.)", "recall@10"],
                [[r["name"], "router" if r["fixed_config_id"] is None
                  else f"fixed config {r['fixed_config_id']}", _number(r["flops_fraction"]),
                  _number(r["flops_fraction_with_router"]),
                  f"{r[METRIC]:.4f} ({r['standard_errors'][METRIC]:.4f})",
                  _number(r["recall@10"])]
                 for r in report["against"]],
            ),
            "",
        ]
    lines += [
        "## Comparisons: CANet at a budget - other, NDCG@10",
        "",
        f"{_sentence(report['protocol']['interval'])} {_sentence(VERDICT_RULE)} "
        f"{_sentence('the ' + SELECTION)}",
        "",
        *_table(
            ["budget", "other", "its FLOPs", "no more FLOPs", "CANet", "other's",
             "difference", "95% interval", "verdict"],
            [[f"{c['budget']:g}", c["other"] or f"({c['note']})",
              _number(c["other_flops_fraction"]),
              "-" if c["no_more_flops"] is None else ("yes" if c["no_more_flops"] else "no"),
              _number(c.get("mean_a")), _number(c.get("mean_b")),
              "-" if c["verdict"] is None else f"{c['difference']:+.4f}",
              "-" if c["verdict"] is None else f"[{c['low']:+.4f}, {c['high']:+.4f}]",
              c["verdict"] or "-"]
             for c in report["comparisons"]],
        ),
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], directory: str | Path, *,
                 log: Log | None = _stderr) -> list[Path]:
    """Write ``pareto.json``, ``pareto.md`` and (when matplotlib is importable) ``pareto.png``
    into ``directory``, each atomically; without matplotlib, say so through ``log`` once and
    skip the plot. Returns the paths written."""
    directory = Path(directory)
    written = [
        write_text_atomic(json.dumps(report, indent=1) + "\n", directory / "pareto.json"),
        write_text_atomic(render_markdown(report), directory / "pareto.md"),
    ]
    try:
        import matplotlib
    except ImportError:
        if log is not None:
            log("pareto: matplotlib is not installed: no pareto.png (pip install matplotlib)")
        return written
    matplotlib.use("Agg")  # files only; never needs a display
    written.append(write_bytes_atomic(_plot_png(report), directory / "pareto.png"))
    return written


def _plot_png(report: dict[str, Any]) -> bytes:
    """NDCG@10 against the FLOPs fraction (router included where a router runs), as PNG."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    try:
        budgets = report["budgets"]
        ax.plot([r["flops_fraction_with_router"] for r in budgets], [r[METRIC] for r in budgets],
                marker="o", color="C0", label="CANet at each budget")
        # Budgets that route identically (lambda 0 above the router's own cost) share a point:
        # one label "b=0.2-1" instead of overprinted ones.
        points: dict[tuple[float, float], list[float]] = {}
        for r in budgets:
            points.setdefault((r["flops_fraction_with_router"], r[METRIC]), []).append(
                r["budget"])
        for (x, y), same in points.items():
            text = f"b={same[0]:g}" if len(same) == 1 else f"b={same[0]:g}-{same[-1]:g}"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color="C0")
        fixed = report["fixed"]
        ax.scatter([r["flops_fraction"] for r in fixed], [r[METRIC] for r in fixed],
                   marker="s", color="C1", label="fixed sub-networks (config id)")
        for r in fixed:
            ax.annotate(str(r["config_id"]), (r["flops_fraction"], r[METRIC]),
                        textcoords="offset points", xytext=(3, -9), fontsize=7, color="C1")
        random = report["random"]
        ax.scatter([r["flops_fraction"] for r in random], [r[METRIC] for r in random],
                   marker="x", color="C2", label="random routing, same histogram")
        for index, r in enumerate(report["against"]):
            ax.scatter([r["flops_fraction_with_router"]], [r[METRIC]], marker="D",
                       color=f"C{3 + index % 7}", label=r["name"])
            ax.annotate(r["name"], (r["flops_fraction_with_router"], r[METRIC]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(xlabel="FLOPs per user / largest sub-network's (router included where it runs)",
               ylabel="NDCG@10",
               title=f"{report['run'].get('path', 'CANet')}: {report['split']}, "
               f"{report['num_users']} users")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()
