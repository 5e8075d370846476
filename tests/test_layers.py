"""The package's layers only point down: a module imports from its own layer or those below it, and no
modules import each other in a circle.

Every import statement counts, those inside functions too (a lazy import is still a dependency).
"""

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "fmnist"
# From the bottom up. A module's layer is the first entry whose path prefix it has.
LAYERS = [
    ("core", ["__init__.py", "errors.py", "config.py", "overrides.py", "fsio.py", "console.py", "hardware.py", "runs.py", "provenance.py", "stops.py", "cli.py"]),
    ("data and models", ["data/", "models.py"]),
    ("training", ["training/"]),
    ("inference", ["inference/"]),
    ("results", ["results/"]),
    ("sweeps", ["sweeps/"]),
]


def layer_of(path: Path) -> int:
    relative = path.relative_to(PACKAGE).as_posix()
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(relative == p or (p.endswith("/") and relative.startswith(p)) for p in prefixes):
            return rank
    raise AssertionError(f"fmnist/{relative} is in no layer: add it to LAYERS (and docs/architecture.md)")


def module_path(dotted: str) -> Path:
    """The file of `fmnist.a.b` (a module, or a package's __init__); a name inside one resolves to that one."""
    parts = dotted.split(".")[1:]
    while parts:
        base = PACKAGE.joinpath(*parts)
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
        parts.pop()
    return PACKAGE / "__init__.py"


def imports_of(path: Path, in_functions: bool = True) -> set[str]:
    """The modules `path` imports, function bodies included or (`in_functions=False`) only those imported
    as the file is loaded. For `from fmnist.m import n`, also `fmnist.m.n`: `n` may be a module."""
    found, stack = set(), list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not in_functions:
            continue  # runs when called, not when loaded
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:  # `from . import x` would hide from these checks
            raise AssertionError(f"{path}: relative import (line {node.lineno}); the package imports by full name")
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module.split(".")[0] == "fmnist":
                found |= {f"{node.module}.{a.name}" for a in node.names}
        stack += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in sorted(n for n in imports_of(path) if n.split(".")[0] == "fmnist"):
            target = module_path(name)
            if layer_of(target) > layer_of(path):
                upward.append(f"fmnist/{path.relative_to(PACKAGE)} ({LAYERS[layer_of(path)][0]}) imports {name} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from fmnist.sweeps.tune import main\n")
    assert imports_of(source) == {"fmnist.sweeps.tune", "fmnist.sweeps.tune.main"}
    assert imports_of(source, in_functions=False) == set()
    assert layer_of(module_path("fmnist.sweeps.tune.main")) == len(LAYERS) - 1
    assert module_path("fmnist.CLASS_NAMES") == PACKAGE / "__init__.py"


def test_evaluate_predict_and_export_start_without_lightning():
    # Lightning (and the torch compiler it imports) doubles a command's start-up; using a model needs neither.
    chains = {}
    todo = [(ROOT / f"{name}.py", (f"{name}.py",)) for name in ("evaluate", "predict", "export")]
    todo += [(PACKAGE / "inference" / f"{name}.py", (f"fmnist.inference.{name}",)) for name in ("evaluate", "predict", "export")]
    seen = set()
    while todo:
        path, chain = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports_of(path, in_functions=False):
            if name.split(".")[0] == "fmnist":
                todo.append((module_path(name), chain + (name,)))
            elif name.split(".")[0] in ("lightning", "pytorch_lightning"):
                chains[name] = " -> ".join(chain + (name,))
    assert not chains, "imported at start-up: " + "; ".join(chains.values())
    assert (PACKAGE / "training" / "module.py") not in seen  # the check follows the package: it would see Lightning there


def import_circle(edges: dict[Path, set[Path]]) -> list[Path]:
    """One circle of imports in `edges` (a module -> the modules it imports), as a path that ends where it
    starts; [] when there is none."""
    state: dict[Path, str] = {}  # "open" while on the current trail, then "done"

    def visit(node: Path, trail: list[Path]) -> list[Path]:  # trail: from the start to `node`, both included
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt, trail + [nxt])):
                return circle
        state[node] = "done"
        return []

    for start in sorted(edges):
        if start not in state and (circle := visit(start, [start])):
            return circle
    return []


def test_no_modules_import_each_other_in_a_circle():
    # Within a layer too: a circle makes the import order matter and hides which module is the lower one.
    edges = {path: {module_path(n) for n in imports_of(path) if n.split(".")[0] == "fmnist"} - {path}
             for path in PACKAGE.rglob("*.py")}
    circle = import_circle(edges)
    assert not circle, "import circle: " + " -> ".join(f"fmnist/{p.relative_to(PACKAGE)}" for p in circle)


def test_the_circle_check_finds_a_circle():
    a, b, c = Path("a"), Path("b"), Path("c")
    assert import_circle({a: {b}, b: {c}, c: set()}) == []
    assert import_circle({a: {b}, b: {c}, c: {a}}) == [a, b, c, a]
    assert import_circle({a: {b}, b: {c}, c: {b}}) == [b, c, b]
