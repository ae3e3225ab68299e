"""The package's shape, read from the source (torch itself imports argparse, so ``sys.modules``
cannot tell): each layer imports only the layers below it, no import cycle, argparse only in the
command-line layer, and a lean ``import canet`` (no triton, no serving package)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "canet"
KERNELS = ROOT / "kernels"  # installed as canet.kernels

# Layer of each module, by name prefix (the longest matching prefix wins). A module may import
# its own layer and the layers below; "inference" and "data" are siblings that never import
# each other. The README's layout table states the same order.
LAYERS = {
    "canet._version": ("base", 0),
    "canet.errors": ("base", 0),
    "canet._io": ("base", 0),
    "canet.space": ("core", 1),
    "canet.model": ("core", 1),
    "canet.losses": ("core", 1),
    "canet.flops": ("core", 1),
    "canet.budget": ("core", 1),
    "canet.checks": ("core", 1),
    "canet.metrics": ("core", 1),
    "canet._ext": ("inference", 2),
    "canet.ops": ("inference", 2),
    "canet.engine": ("inference", 2),
    "canet.export": ("inference", 2),
    "canet.backends": ("inference", 2),
    "canet.kernels": ("inference", 2),
    "canet.data": ("data", 2),
    "canet.config": ("training", 3),
    "canet.distributed": ("training", 3),
    "canet.checkpoint": ("training", 3),
    "canet.train": ("training", 3),
    "canet.evaluate": ("training", 3),
    "canet.calibrate": ("training", 3),
    "canet.recommender": ("apps", 4),
    "canet.bench": ("apps", 4),
    "canet.pareto": ("apps", 4),
    "canet.info": ("apps", 4),
    "canet.serve": ("apps", 4),
    "canet.cli": ("apps", 5),
    "canet.cli.serve": ("apps", 5),
    "canet.__main__": ("apps", 5),
}
# Where argparse may be imported: the command line, and the benchmark's own entry point.
ARGPARSE_ALLOWED = ("canet.cli", "canet.bench.__main__")


def _module_files() -> dict[str, Path]:
    files = {}
    for base, prefix in ((PACKAGE, "canet"), (KERNELS, "canet.kernels")):
        for path in sorted(base.rglob("*.py")):
            if "kernels" in path.relative_to(base).parts and base == PACKAGE:
                continue  # a development symlink canet/kernels -> ../kernels
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([prefix, *parts])] = path
    return files


MODULES = _module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """canet modules named by one ``from X import a, b`` (a submodule ``a`` counts as itself)."""
    if node.level:
        package = module if _is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    named = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        named.append(candidate if candidate in MODULES else base)
    return named


def _imports(module: str) -> set[str]:
    """Every canet module ``module`` imports, at module level or inside functions."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.update(_resolve(module, node))
    return {name for name in found if name in MODULES and name != module}


def _layer(module: str) -> tuple[str, int]:
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    if not matches:
        raise AssertionError(f"{module} has no layer in tests/test_layering.py: add it")
    return LAYERS[max(matches, key=len)]


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        if module != "canet":
            _layer(module)


def test_each_layer_imports_only_the_layers_below() -> None:
    wrong = []
    for module, imported in GRAPH.items():
        if module == "canet":  # the facade re-exports from every layer
            continue
        name, rank = _layer(module)
        for other in imported:
            if other == "canet":
                wrong.append(f"{module} imports the canet facade (import the module itself)")
                continue
            other_name, other_rank = _layer(other)
            siblings = {name, other_name} == {"inference", "data"}
            if other_rank > rank or siblings:
                wrong.append(f"{module} ({name}) imports {other} ({other_name})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    # Depth-first search over the import graph; any back edge is a cycle.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for other in sorted(GRAPH[module]):
            if other == "canet":
                continue
            if state.get(other) == 1:
                cycles.append(" -> ".join([*stack[stack.index(other):], other]))
            elif other not in state:
                visit(other)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


def test_argparse_only_in_the_command_line_layer() -> None:
    users = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if "argparse" in names and not module.startswith(ARGPARSE_ALLOWED):
                users.append(f"{module}:{node.lineno}")
    assert not users, f"argparse outside canet/cli/ and the bench entry point: {users}"


def test_the_layer_tests_can_fail(tmp_path) -> None:
    """The checks above see a violation when there is one: an upward import and a cycle."""
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {**saved, "canet.space": saved["canet.space"] | {"canet.engine"}}
        with pytest.raises(AssertionError, match="canet.space \\(core\\) imports canet.engine"):
            test_each_layer_imports_only_the_layers_below()
        with pytest.raises(AssertionError, match="canet.space"):
            test_no_import_cycle()
    finally:
        GRAPH = saved


# The serving packages (the extra canet[serve] and their kin): loaded only by canet serve.
SERVING = ("fastapi", "starlette", "uvicorn", "aiohttp", "httpx", "prometheus_client", "anyio")


def test_import_canet_is_lean() -> None:
    """``import canet`` (and reaching Engine, Recommender) pulls in neither triton nor a serving
    package, nor the command line; ``canet.serve`` and the command-line parser (which imports
    every command's module, ``canet.cli.serve`` included) load the serving packages only when
    an app is created or the server run."""
    heavy = ("triton", "canet.kernels", "canet.cli", "canet.bench", *SERVING)
    loaded = _loaded_after("import canet\ncanet.Engine, canet.Recommender", heavy)
    assert loaded == "[]", f"import canet loaded {loaded}"
    loaded = _loaded_after("import canet.serve, canet.cli\ncanet.cli.build_parser()", SERVING)
    assert loaded == "[]", f"import canet.serve / the parser loaded {loaded}"


def _loaded_after(code: str, names: tuple[str, ...]) -> str:
    """The modules among ``names`` (or inside those packages) that a fresh interpreter has
    loaded after running ``code``, as a printed sorted list."""
    script = (
        f"import sys\n{code}\nheavy = {names!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.strip()


def test_readme_layout_table_matches_the_tree() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths = {row.split("|")[1].strip().strip("`").rstrip("/")
             for row in table.splitlines() if row.startswith("| `")}
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README layout names paths that do not exist: {missing}"
    packages = {f"canet/{p.name}" for p in PACKAGE.iterdir()
                if p.is_dir() and (p / "__init__.py").exists() and not p.is_symlink()}
    assert packages <= paths, f"README layout lacks {sorted(packages - paths)}"


def test_readme_operators_table_names_existing_files() -> None:
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Operators", 1)[1].split("\n## ", 1)[0]
    files = set(re.findall(r"`([\w./-]+\.(?:py|cpp|cu|cuh|h))`", section))
    assert len(files) >= 10
    missing = sorted(f for f in files if not (ROOT / f).is_file())
    assert not missing, f"README operators table names files that do not exist: {missing}"
