"""The package's plan holds (README, Layout): imports between llamalite's modules form no circle, function-level
imports included and `if TYPE_CHECKING:` blocks left out, and no module imports another's private
(_underscore) name."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "llamalite"


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(modules: dict[str, Path]) -> dict[str, list[tuple[str, str, int]]]:
    """module -> [(imported module, imported name or "", line)], resolved to llamalite's own modules."""
    out = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        found = []
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [(a.name, "") for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets = [(f"{base}.{a.name}", "") if f"{base}.{a.name}" in modules else (base, a.name)
                           for a in node.names]
            for target, imported in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "llamalite":
                    found.append((target, imported, node.lineno))
        out[name] = found
    return out


def test_no_import_circle():
    modules = _modules()
    graph = {m: sorted({t for t, _, _ in edges}) for m, edges in _imports(modules).items()}
    state, path, circles = {}, [], []

    def visit(m):  # depth-first; an edge back to a module on the current path closes a circle
        state[m] = "open"
        path.append(m)
        for t in graph[m]:
            if state.get(t) == "open":
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_private_name_crosses_a_module():
    private = [f"{m}:{line} imports {target}.{name}" for m, edges in _imports(_modules()).items()
               for target, name, line in edges if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def test_no_module_over_800_lines_and_few_at_the_top():
    """Files are split by concern before they grow past twice a module's natural size, and the package's top
    holds its face, __main__ and the backend choice, not the modules themselves (C++ is not counted)."""
    long = [f"{p.relative_to(PACKAGE.parent)} {n}" for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 800]
    assert not long, long
    top = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top) <= 10, top
