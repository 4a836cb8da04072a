"""The shape of the code, read statically: imports run one way (no cycle, function-level imports included) and the
leaf modules import nothing from rwray but `rwray.errors`.

Every ``import`` / ``from ... import`` anywhere in a module (top level, inside functions, under TYPE_CHECKING) is an
edge to the module that provides the name: ``from rwray.data import biased`` -> ``rwray.data.biased`` (a submodule),
``from rwray.data import Manifest`` -> ``rwray.data`` (the package's ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rwray"

# Modules every other module may lean on: they import nothing from rwray except the error classes.
LEAVES = {
    "rwray.errors", "rwray.datainfo", "rwray.registry", "rwray.dist", "rwray.hsic", "rwray.metrics", "rwray.plots",
    "rwray.tables", "rwray.gram.kernels", "rwray.output", "rwray.text", "rwray.memwatch", "rwray.rehearse_report",
}
LEAF_MAY_IMPORT = {"rwray.errors"}


def module_names() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The rwray modules ``name`` imports, anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "rwray"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "rwray":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in known else mod)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = module_names()
    return {n: imports(n, p, set(mods)) for n, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_leaves_import_nothing_from_rwray_but_errors():
    g = graph()
    assert LEAVES <= set(g), f"leaf modules missing: {sorted(LEAVES - set(g))}"
    bad = {leaf: sorted(g[leaf] - LEAF_MAY_IMPORT) for leaf in LEAVES if g[leaf] - LEAF_MAY_IMPORT}
    assert not bad, f"leaf modules importing rwray: {bad}"
    assert not g["rwray.errors"], "rwray.errors imports nothing from rwray"


def test_no_submodule_imports_its_own_package_init():
    """A package's __init__ imports its submodules; a submodule taking a name from that __init__ works only when the
    package happens to be imported first."""
    g = graph()
    bad = sorted(f"{n} -> {m}" for n, deps in g.items() for m in deps if n.startswith(m + "."))
    assert not bad, bad


def test_the_checker_sees_cycles_and_function_level_imports(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found."""
    pkg = tmp_path / "rwray"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from rwray.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from rwray import a\n    return a\n")
    (pkg / "c.py").write_text("from .a import f\n")
    names = {"rwray": pkg / "__init__.py", "rwray.a": pkg / "a.py", "rwray.b": pkg / "b.py", "rwray.c": pkg / "c.py"}
    g = {n: imports(n, p, set(names)) for n, p in names.items()}
    assert g == {"rwray": set(), "rwray.a": {"rwray.b"}, "rwray.b": {"rwray.a"}, "rwray.c": {"rwray.a"}}
    assert find_cycle(g) == ["rwray.a", "rwray.b", "rwray.a"]
