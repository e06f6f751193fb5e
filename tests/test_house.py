"""Keep the house small: every library file fits in a student's head (<= 300 lines), and no two
files import each other (the imports form no circle, lazy imports inside functions included)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "stamp_min"
MODULES = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def imports(path):
    """The stamp_min modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 or module.startswith("stamp_min"):
                parts = module.removeprefix("stamp_min").strip(".")
                if parts:
                    found.add(parts.split(".")[0])
                else:                                   # from . import x: x may be a module
                    found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("stamp_min.")}
    return found & set(MODULES)


def test_every_library_file_is_at_most_300_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long


def test_no_import_circle():
    graph = {name: imports(path) for name, path in MODULES.items()}
    assert "fcl_loop" in graph["flower_app"] and "flora_na" in graph["flora_loop"]     # the parser sees imports
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", "import circle: " + " -> ".join(stack + [node, nxt])
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"
    for name in sorted(graph):
        if name not in state:
            visit(name, [])
