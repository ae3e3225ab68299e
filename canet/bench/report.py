"""Where the numbers come from and how they are written: machine facts, the tables, the
JSON / Markdown / PNG writers, and the bookkeeping the GPU scripts share (file-name-safe
device names, error texts, SIGTERM).

Result files are written atomically (:func:`canet._io.write_text_atomic`): the GPU scripts
rewrite theirs after every cell, and a kill during a write must leave the previous complete
file, not half of a new one.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .._io import write_text_atomic
from .._version import __version__

__all__ = [
    "Interrupted",
    "error_text",
    "format_table",
    "last_line",
    "format_targets",
    "machine_info",
    "markdown",
    "on_sigterm",
    "slug",
    "table_rows",
    "write_json_and_markdown",
    "write_plots",
]


# -- machine facts -------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git_commit() -> dict[str, object] | None:
    """HEAD of the checkout canet is imported from, and whether tracked files differ from it."""
    root = Path(__file__).resolve().parents[2]  # canet/bench/report.py -> the checkout
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def machine_info() -> dict[str, object]:
    """Where the numbers come from: CPU, cores, threads, versions, git commit, date."""
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cores = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "canet": __version__,
        "git": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# -- the canet bench table -------------------------------------------------------------------
def _rate(users_per_s: float | None) -> str:
    if users_per_s is None:
        return "-"
    if users_per_s >= 1e6:
        return f"{users_per_s / 1e6:.2f}M"
    if users_per_s >= 1e3:
        return f"{users_per_s / 1e3:.2f}k"
    return f"{users_per_s:.1f}"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def table_rows(cases: Sequence[Mapping], backends: Sequence[str]) -> tuple[list[str], list[list]]:
    """(header, rows) of the compact table: one row per (mix, batch)."""
    header = ["mix", "B", "flops", "ideal", "dense u/s", "masked u/s", "sliced u/s"]
    with_ort = any("ort" in case for case in cases)
    if with_ort:
        header += ["ort= u/s", "ort full u/s"]
    for name in backends:
        header += [f"{name} u/s", f"{name} eff", f"{name} xdense", f"{name} xmasked"]
        if with_ort:
            header += [f"{name} xort="]
    rows = []
    for case in cases:
        timings = case["timings"]
        row = [
            case["mix"], str(case["batch"]), f"{case['flops_fraction']:.2f}",
            f"{case['ideal_speedup']:.2f}",
            _rate(timings["supernet_dense"]["users_per_s"]),
            _rate(timings["masked"]["users_per_s"]),
            _rate(timings["supernet_routed"]["users_per_s"]),
        ]
        ort = case.get("ort")
        if with_ort:
            row += [_rate(ort and ort["equal_flops_users_per_s"]),
                    _rate(ort and case["batch"] / ort["largest_s"])]
        for name in backends:
            entry = case["backends"].get(name, {})
            row += [
                _rate(entry.get("users_per_s")), _num(entry.get("efficiency")),
                _num(entry.get("speedup_vs_dense")), _num(entry.get("speedup_vs_masked")),
            ]
            if with_ort:
                row += [_num(entry.get("speedup_vs_ort_equal_flops"))]
        rows.append(row)
    return header, rows


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned text table: the mix column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i < 1 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_targets(verdicts: Sequence[Mapping]) -> list[str]:
    lines = []
    for v in verdicts:
        where = f"{v['mix'] or 'any'} B={v['batch']}"
        value = "" if v["value"] is None else f" (got {v['value']:.2f}, need {v['threshold']})"
        reason = f": {v['reason']}" if v.get("reason") else ""
        lines.append(f"[{v['status']}] {where}: {v['text']}{value}{reason}")
    return lines


def markdown(report: Mapping) -> str:
    """The ``canet bench`` report as Markdown: machine, settings, the table, the targets."""
    machine, settings = report["machine"], report["settings"]
    header, rows = table_rows(report["results"], settings["backends_run"])
    git = machine.get("git") or {}
    commit = git.get("commit", "unknown") + (" (dirty)" if git.get("dirty") else "")
    lines = [
        f"# canet bench ({machine['date']})",
        "",
        f"- CPU: {machine['cpu_model']} ({machine['usable_cores']} usable cores), "
        f"torch {machine['torch']}, {machine['torch_threads']} threads",
        f"- canet {machine['canet']}, commit {commit}",
        f"- shape: N={settings['num_items']} items, L={settings['seq_len']}, "
        f"{settings['n_configs']} configs, float32, inference_mode",
        f"- timing: median of repeats after warm-up, >= {settings['min_time']} s and "
        f">= {settings['min_repeats']} repeats per measurement"
        + (" (quick)" if settings["quick"] else ""),
    ]
    for name, why in settings["backends_skipped"].items():
        kind = "baseline" if name == "ort" else "backend"
        lines.append(f"- {kind} `{name}` not measured: {why}")
    lines += [
        "",
        "flops = routed FLOPs / all-largest FLOPs; ideal = 1 / flops; eff = (same backend "
        "all-largest time / routed time) / ideal; xdense, xmasked = speedup over the PyTorch "
        "supernet dense and the masked path; u/s = users per second."
        + (" ort= = ONNX Runtime on the fixed sub-network of the batch's FLOPs (the two "
           "configs nearest in FLOPs, interpolated); ort full = ONNX Runtime, largest config; "
           "xort= = speedup over ort=." if settings.get("baselines_run") else ""),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "## Targets",
        "",
        *(f"- {line}" for line in format_targets(report["targets"])),
        "",
    ]
    return "\n".join(lines)


def write_plots(report: Mapping, directory: Path) -> list[Path]:
    """PNG per mix (users/s vs batch size for every method) and one of efficiency vs batch."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    directory.mkdir(parents=True, exist_ok=True)
    cases = report["results"]
    batches = sorted({c["batch"] for c in cases})
    written = []

    def batch_axis(ax) -> None:
        # Ticks at the measured batch sizes, as plain numbers (log axes default to 10^k).
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_locator(NullLocator())

    for mix in dict.fromkeys(c["mix"] for c in cases):
        mine = sorted((c for c in cases if c["mix"] == mix), key=lambda c: c["batch"])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in mine[0]["timings"]:
            ax.plot([c["batch"] for c in mine],
                    [c["timings"][method]["users_per_s"] for c in mine], marker="o",
                    label=method)
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="users / s",
               title=f"canet bench: {mix} mix")
        batch_axis(ax)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        path = directory / f"users_per_s-{mix}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in report["settings"]["backends_run"]:
        for mix in dict.fromkeys(c["mix"] for c in cases):
            mine = sorted((c for c in cases if c["mix"] == mix), key=lambda c: c["batch"])
            # The largest mix has ideal speedup 1: its line only shows measurement noise.
            ax.plot([c["batch"] for c in mine],
                    [c["backends"][name].get("efficiency", math.nan) for c in mine],
                    marker="o", linestyle=":" if mix == "largest" else "-",
                    label=f"{name} {mix}")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set(xscale="log", xlabel="batch size", ylabel="efficiency (measured / ideal speedup)",
           title="routing efficiency per backend")
    batch_axis(ax)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = directory / "efficiency.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    return written


# -- result files ------------------------------------------------------------------------------
def last_line(path: Path) -> str:
    """The last non-empty line of a child process's log (its exception's one-line message),
    cut to 500 characters, for an error that says why the child failed."""
    lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:500] if lines else "it printed nothing"


def write_json_and_markdown(
    json_path: str | os.PathLike[str],
    data: object,
    markdown_path: str | os.PathLike[str],
    text: str,
) -> tuple[Path, Path]:
    """Write ``data`` as indented JSON and ``text`` as Markdown, each atomically (parent
    directories are created). Returns the two paths."""
    return (write_text_atomic(json.dumps(data, indent=2) + "\n", json_path),
            write_text_atomic(text, markdown_path))


# -- bookkeeping of the GPU scripts ----------------------------------------------------------
class Interrupted(BaseException):
    """SIGTERM (``timeout``): not an Exception, so no per-cell handler swallows it."""


def on_sigterm(signum, frame):
    """A SIGTERM handler that raises :class:`Interrupted` (install with ``signal.signal``)."""
    raise Interrupted(f"signal {signum}")


def slug(name: str) -> str:
    """A device name as a file-name piece: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()) or "unknown"


def error_text(exc: BaseException) -> str:
    """``Type: message`` of an exception, cut to 2000 characters (one JSON field)."""
    return f"{type(exc).__name__}: {exc}"[:2000]
