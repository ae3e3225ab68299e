"""What the GPU kernels cost to compile and run resources, found without a GPU.

Triton kernels: the Triton backend's forwards (``scores_from_ids``, the router excluded) are
run on CPU tensors with every kernel launch recorded instead of executed; the launch sequence
of a forward depends on shapes and dtypes only (the backend never reads a device value), so
the record holds every specialization (Triton's compile key: argument types, 16-divisibility
and 16-byte alignment, ints equal to 1, constexprs, options) that a GPU run of the same shapes
would compile. Each unique one is then compiled for ``--arch`` with the installed triton,
cold (a temporary Triton cache), and reported: warps, pipeline stages, shared memory against
the architecture's per-block limit, registers and spills (the ptxas that triton uses, ``-v``),
and the seconds it took here. The count and total are what a first GPU run spends compiling
those shapes (on this machine's CPU).

CUDA kernels (``csrc/cuda/*_kernel.cu``): ``nvcc -Xptxas -v`` for the same architecture,
registers, spills and static shared memory per kernel (score_topk's dynamic shared memory
depends on k; its launcher reports it).

No number here is a GPU timing. Writes ``<out>/<name>.json`` and ``.md`` (default
``benches/results/<date>-sm<arch>-kernels``) and prints the tables.

    python benches/kernel_report.py                       # sm_90, the default shape set
    python benches/kernel_report.py --batch 1 8 64 --max-len 50 --dtypes bf16
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from canet import CANet, RoutingSpace
from canet.bench import DTYPES, write_json_and_markdown

ROOT = Path(__file__).resolve().parents[1]  # the checkout: csrc/ and the default results/
# JITFunction._pack_args and get_ptxas(arch), which compute and compile a key as a launch does.
MIN_TRITON = (3, 6)
# Largest dynamic shared memory one block may opt in to (CUDA programming guide, compute
# capabilities table); Triton refuses to load a kernel that needs more.
SHARED_LIMIT_BYTES = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                      100: 232448, 120: 101376}


@dataclass
class Launch:
    """One recorded launch: the JITFunction, its arguments, and the forward it came from."""

    kernel: object
    args: tuple
    kwargs: dict
    case: str


@dataclass
class Specialization:
    """One compile key of one kernel and the launches (cases) that need it."""

    kernel: object
    kwargs: dict
    bound_args: dict
    specialization: list
    options: object
    cases: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.__name__.strip("_")


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Record every ``kernel[grid](...)`` launch (nothing runs) and let the Triton backend
    build on CPU tensors. Yields the list the launches are appended to; the ``case``
    attribute of each is filled in by :func:`record_forwards`."""
    from triton.runtime.jit import JITFunction

    from canet.backends import triton_backend

    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, case=""))

    saved_run, saved_check = JITFunction.run, triton_backend.interpreter_enabled
    JITFunction.run, triton_backend.interpreter_enabled = record, lambda: True
    try:
        yield launches
    finally:
        JITFunction.run, triton_backend.interpreter_enabled = saved_run, saved_check


def record_forwards(
    dtypes: Iterable[str],
    batches: Iterable[int],
    max_lens: Iterable[int],
    items: Iterable[int],
    space: RoutingSpace | None = None,
) -> list[Launch]:
    """The launches of one Triton-backend forward per (dtype, items, max_len, batch).

    A forward launches the same kernels whatever the routing mix (3 + 5 x max_depth, every
    block included); the ids cycle through the space all the same. Tensors are allocated,
    never written."""
    from canet.backends import triton_backend

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernel_report records compiled kernels: unset TRITON_INTERPRET")
    require_triton()
    space = space or RoutingSpace()
    launches: list[Launch] = []
    with recording_launches() as recorded:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for num_items in items:
                for max_len in max_lens:
                    model = CANet(num_items, max_len, space=space).to(dtype).eval()
                    backend = triton_backend.Backend(
                        model.arch, model.state_dict(), torch.device("cpu")
                    )
                    for batch in batches:
                        seqs = torch.ones(batch, max_len, dtype=torch.int64)
                        ids = torch.arange(batch) % len(space)
                        start = len(recorded)
                        backend.scores_from_ids(seqs, ids)
                        case = f"{dtype_name} B={batch} L={max_len} N={num_items}"
                        for launch in recorded[start:]:
                            launch.case = case
        launches.extend(recorded)
    return launches


def require_triton() -> None:
    """Refuse a triton older than :data:`MIN_TRITON` with a readable reason."""
    from canet.backends.triton_backend import _triton_version

    found = _triton_version()
    if found is None or found < MIN_TRITON:
        have = "no triton" if found is None else "triton " + ".".join(map(str, found))
        raise RuntimeError(
            f"kernel_report needs triton >= {'.'.join(map(str, MIN_TRITON))} (its compile-key "
            f"and ptxas helpers), found {have}; the kernels themselves run with triton >= 3.4"
        )


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def specializations(launches: Iterable[Launch], arch: int = 90) -> list[Specialization]:
    """The unique compile keys of ``launches`` for ``arch``, in first-launch order (computed
    by Triton's own binder, as ``JITFunction.run`` does on a GPU)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target(arch))
    binders: dict[int, object] = {}
    found: dict[tuple, Specialization] = {}
    for launch in launches:
        kernel = launch.kernel
        kwargs = {**launch.kwargs, "debug": False}
        if id(kernel) not in binders:
            binders[id(kernel)] = create_function_from_signature(
                kernel.signature, kernel.params, backend
            )
        bound, spec, options = binders[id(kernel)](*launch.args, **kwargs)
        key = (id(kernel), repr(spec), repr(sorted(options.items())))
        if key not in found:
            found[key] = Specialization(kernel, kwargs, bound, spec, options)
        if launch.case not in found[key].cases:
            found[key].cases.append(launch.case)
    return list(found.values())


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` (the ptxas triton compiles with)."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.ptx")
        path.write_text(ptx)
        proc = subprocess.run(
            [get_ptxas(arch).path, f"-arch={target.group(1) if target else f'sm_{arch}'}",
             "-v", str(path), "-o", str(Path(tmp, "kernel.cubin"))],
            capture_output=True, text=True, timeout=300,
        )
    if proc.returncode != 0:
        return {"ptxas_error": proc.stderr.strip()[-500:]}
    rows = _parse_ptxas(proc.stderr)
    return {k: v for k, v in rows[-1].items() if k != "function"} if rows else {}


def _parse_ptxas(text: str) -> list[dict]:
    """Per-function rows of ``ptxas -v`` output: name, registers, spill bytes, shared."""
    rows: list[dict] = []
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        if entry:
            rows.append({"function": entry.group(1)})
            continue
        if not rows:
            continue
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill:
            rows[-1]["spill_store_bytes"] = int(spill.group(1))
            rows[-1]["spill_load_bytes"] = int(spill.group(2))
        regs = re.search(r"Used (\d+) registers", line)
        if regs:
            rows[-1]["registers"] = int(regs.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            rows[-1]["static_shared_bytes"] = int(smem.group(1)) if smem else 0
    return rows


def _variant(spec: Specialization) -> str:
    """The launcher's choices that tell this compile apart, in a few words."""
    args = spec.bound_args
    dtype = next((name for name, d in DTYPES.items() for v in args.values()
                  if isinstance(v, torch.Tensor) and v.dtype == d), "")
    if "EPILOGUE" in args:
        from canet.kernels.grouped_linear import EPILOGUES, K_SOURCES, N_SOURCES

        def name_of(table: dict, code: int) -> str:
            return {v: k for k, v in table.items()}[code]

        gather = "+gather" if args["GATHER"] else ""
        return (f"{dtype} {name_of(EPILOGUES, args['EPILOGUE'])}{gather} "
                f"K:{name_of(K_SOURCES, args['K_SOURCE'])} N:{name_of(N_SOURCES, args['N_SOURCE'])}"
                f" tile {args['BLOCK_M']}x{args['BLOCK_N']}x{args['BLOCK_K']}"
                f" x{args['N_BLOCKS']}"
                f"{'' if args['EVEN_K'] else ' masked-K'}")
    if "HEAD_DIM_PAD" in args:
        return f"{dtype} d{args['HEAD_DIM_PAD']} block {args['BLOCK_M']}"
    return f"groups {args.get('GROUPS_PAD')} depth {args.get('MAX_DEPTH')}"


def _int_keys(spec: Specialization) -> str:
    """The int arguments this compile is specialized on: ``name=1`` (compiled as a constant)
    or ``name%16`` (known divisible by 16); the rest of the key is in the variant."""
    keys = []
    for param, (kind, attr) in zip(spec.kernel.params, spec.specialization, strict=True):
        value = spec.bound_args[param.name]
        if param.is_constexpr or isinstance(value, bool) or not isinstance(value, int):
            continue
        if kind == "constexpr":
            keys.append(f"{param.name}=1")
        elif attr == "D":
            keys.append(f"{param.name}%16")
    return " ".join(keys) or "-"


def compile_specialization(spec: Specialization, arch: int = 90) -> dict:
    """Compile one specialization for ``arch`` (as ``JITFunction.run`` would) and measure it."""
    from triton.compiler import ASTSource, compile, make_backend

    backend = make_backend(_target(arch))
    options, signature, constexprs, attrs = spec.kernel._pack_args(
        backend, spec.kwargs, spec.bound_args, spec.specialization, spec.options
    )
    row = {"kernel": spec.name, "variant": "", "cases": spec.cases}
    start = time.perf_counter()
    try:
        compiled = compile(ASTSource(spec.kernel, signature, constexprs, attrs),
                           target=_target(arch), options=options.__dict__)
    except Exception as exc:  # recorded: one broken specialization must not hide the others
        row.update(error=f"{type(exc).__name__}: {exc}"[:2000])
        return row
    row["compile_s"] = round(time.perf_counter() - start, 3)
    row["variant"] = _variant(spec)
    row["int_keys"] = _int_keys(spec)
    meta = compiled.metadata
    row.update(num_warps=meta.num_warps, num_stages=meta.num_stages, shared_bytes=meta.shared)
    limit = SHARED_LIMIT_BYTES.get(arch)
    row["shared_fits"] = None if limit is None else meta.shared <= limit
    row.update(_ptxas_report(compiled.asm["ptx"], arch))
    return row


def cuda_kernel_report(arch: int = 90, nvcc: str | None = None) -> list[dict]:
    """``nvcc -Xptxas -v`` rows of every ``csrc/cuda/*_kernel.cu`` (empty without nvcc)."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return []
    rows = []
    for source in sorted((ROOT / "csrc" / "cuda").glob("*_kernel.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [nvcc, "-c", "-std=c++17", f"-arch=sm_{arch}", "-Xptxas", "-v", str(source),
                 "-o", str(Path(tmp, "k.o"))],
                capture_output=True, text=True, timeout=600,
            )
        if proc.returncode != 0:
            rows.append({"source": source.name, "error": proc.stderr.strip()[-2000:]})
            continue
        for row in _parse_ptxas(proc.stderr):
            row["function"] = _demangle(row["function"])
            rows.append({"source": source.name, **row})
    return rows


def _demangle(name: str) -> str:
    """A readable kernel name: ``score_chunk_kernel<__half>`` rather than the mangled one."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool:
        out = subprocess.run([tool, name], capture_output=True, text=True).stdout.strip()
        # "void ns::(anonymous namespace)::kernel<T>(args)": the name before the argument list
        found = re.search(r"(\w+(?:<[^()]*>)?)\((?!anonymous)", out)
        if found:
            return found.group(1)
    return name


def markdown(meta: dict, triton_rows: list[dict], cuda_rows: list[dict]) -> str:
    lines = [
        f"# canet kernels for sm_{meta['arch']}, compiled without a GPU ({meta['date']})",
        "",
        f"triton {meta['triton']}, torch {meta['torch']}, nvcc: {meta['nvcc'] or 'not used'}; "
        f"{meta['host_cpus']} CPUs here. Static facts, not GPU timings.",
        "",
        f"## Triton: {len(triton_rows)} specializations from {meta['forwards']} forwards "
        f"({meta['launches']} launches), {meta['compile_s_total']} s to compile cold here",
        "",
        f"Shapes: dtypes {', '.join(meta['dtypes'])}; B {meta['batches']}; L {meta['max_lens']}; "
        f"N {meta['items']}; the default routing space. Shared memory limit per block: "
        f"{meta['shared_limit_bytes']} bytes.",
        "",
        "| kernel | variant | int keys | warps | stages | shared B | fits | regs | "
        "spill st/ld B | compile s | forwards |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in triton_rows:
        if "error" in row:
            lines.append(f"| {row['kernel']} | ERROR: {row['error'][:200]} | | | | | | | | | "
                         f"{len(row['cases'])} |")
            continue
        spills = f"{row.get('spill_store_bytes', '?')}/{row.get('spill_load_bytes', '?')}"
        fits = {True: "yes", False: "**NO**", None: "?"}[row["shared_fits"]]
        lines.append(
            f"| {row['kernel']} | {row['variant']} | {row['int_keys']} | {row['num_warps']} | "
            f"{row['num_stages']} | "
            f"{row['shared_bytes']} | {fits} | {row.get('registers', '?')} | {spills} | "
            f"{row['compile_s']} | {len(row['cases'])} |"
        )
    lines += ["", f"## CUDA (`csrc/cuda/*_kernel.cu`, nvcc -Xptxas -v, sm_{meta['arch']})", ""]
    if not cuda_rows:
        lines.append("Skipped (--no-cuda)." if meta["no_cuda"] else "nvcc not found: not compiled.")
    else:
        lines += ["| source | kernel | regs | spill st/ld B | static shared B |",
                  "|---|---|---:|---:|---:|"]
        for row in cuda_rows:
            if "error" in row:
                lines.append(f"| {row['source']} | ERROR: {row['error'][:200]} | | | |")
                continue
            lines.append(
                f"| {row['source']} | `{row['function']}` | {row.get('registers', '?')} | "
                f"{row.get('spill_store_bytes', '?')}/{row.get('spill_load_bytes', '?')} | "
                f"{row.get('static_shared_bytes', 0)} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, 90 = sm_90")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 77, 256, 4096])
    parser.add_argument("--max-len", type=int, nargs="+", default=[1, 13, 50])
    parser.add_argument("--items", type=int, nargs="+", default=[3000, 40000])
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc report")
    parser.add_argument("--out", type=Path, default=ROOT / "benches" / "results")
    parser.add_argument("--name", default=None,
                        help="base name of the result files (default <date>-sm<arch>-kernels)")
    args = parser.parse_args(argv)
    for name in ("batch", "max_len", "items"):
        if any(v < 1 for v in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} values must be >= 1")
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        parser.error("--name may hold only letters, digits, '.', '_' and '-'")
    return args


def main(argv: list[str] | None = None) -> int:
    import triton

    args = parse_args(argv)
    launches = record_forwards(args.dtypes, args.batch, args.max_len, args.items)
    specs = specializations(launches, args.arch)
    # A cold cache, so the seconds are what a bare GPU machine spends.
    with tempfile.TemporaryDirectory() as cache:
        saved = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            rows = [compile_specialization(spec, args.arch) for spec in specs]
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved
    cuda_rows = [] if args.no_cuda else cuda_kernel_report(args.arch)
    meta = {
        "date": dt.date.today().isoformat(), "arch": args.arch, "triton": triton.__version__,
        "torch": torch.__version__, "nvcc": None if args.no_cuda else shutil.which("nvcc"),
        "no_cuda": args.no_cuda,
        "host_cpus": os.cpu_count(), "dtypes": args.dtypes, "batches": args.batch,
        "max_lens": args.max_len, "items": args.items, "launches": len(launches),
        "forwards": len({launch.case for launch in launches}),
        "shared_limit_bytes": SHARED_LIMIT_BYTES.get(args.arch),
        "compile_s_total": round(sum(r.get("compile_s", 0.0) for r in rows), 1),
    }
    name = args.name or f"{meta['date']}-sm{args.arch}-kernels"
    text = markdown(meta, rows, cuda_rows)
    write_json_and_markdown(args.out / f"{name}.json",
                            {"meta": meta, "triton": rows, "cuda": cuda_rows},
                            args.out / f"{name}.md", text)
    print(text)
    print(f"wrote {args.out / name}.json and .md")
    broken = [r for r in rows + cuda_rows if "error" in r or r.get("shared_fits") is False]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
