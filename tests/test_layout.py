"""The layout of the nsq_local package: its modules import one another without a cycle, so that each can be read
after the ones it builds on (imports inside functions count: a deferred import is still a dependency); and the patched
llama_cpp package never imports nsq_local (nsq-local plugs into it, not the reverse)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nsq_local"


def imports_of(path: Path) -> set[str]:
    """The nsq_local modules a module imports, anywhere in it ("nsq_local.x" for `from nsq_local import x` too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nsq_local."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "nsq_local":
                found.update(f"nsq_local.{a.name}" for a in node.names)
            elif node.module.startswith("nsq_local."):
                found.add(node.module)
    return found


def top_level_imports(path: Path) -> set[str]:
    """The top-level packages a module imports anywhere in it (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def module_graph() -> dict[str, set[str]]:
    modules = {f"nsq_local.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & modules.keys() for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan), as a path that returns to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in groups:
        # walk inside the group from its first module until a module repeats
        path, seen = [group[0]], {group[0]}
        while True:
            nxt = min(w for w in graph[path[-1]] if w in group)
            if nxt in seen:
                out.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return out


def test_the_graph_sees_deferred_imports(tmp_path):
    """The checker itself: an import inside a function is an edge, and a cycle through one is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = "def f():\n    from nsq_local import calibrate\n    import nsq_local.capture\nfrom nsq_local._common import X\n"
    probe = tmp_path / "probe.py"
    probe.write_text(tree)
    assert imports_of(probe) == {"nsq_local.calibrate", "nsq_local.capture", "nsq_local._common"}
    assert top_level_imports(probe) == {"nsq_local"}


def test_no_import_cycle_in_nsq_local():
    graph = module_graph()
    assert "nsq_local.reference" in graph and "nsq_local._common" in graph
    found = cycles(graph)
    assert not found, "import cycles in nsq_local: " + "; ".join(" -> ".join(c) for c in found)


def test_common_and_reference_import_nothing_of_nsq_local():
    """_common is what every module may share and reference the numpy truth every check compares with: both stand
    alone."""
    graph = module_graph()
    assert graph["nsq_local._common"] == set()
    assert graph["nsq_local.reference"] == set()


def test_llama_cpp_never_imports_nsq_local():
    """The installed llama_cpp (the binding, its high-level API and its server, as our patches leave them) imports
    nothing of nsq_local: the default calibration reaches Llama() through llama_cpp's resolver entry point, which
    nsq-local's package metadata registers."""
    import importlib.metadata

    import llama_cpp

    modules = sorted(Path(llama_cpp.__file__).parent.rglob("*.py"))
    assert any(p.name == "llama.py" for p in modules) and any(p.parent.name == "server" for p in modules)
    importing = [str(p) for p in modules if "nsq_local" in top_level_imports(p)]
    assert not importing, f"llama_cpp modules that import nsq_local: {importing}"
    eps = importlib.metadata.entry_points()
    group = (eps.select(group=llama_cpp.NSQ_CALIB_RESOLVER_GROUP) if hasattr(eps, "select")
             else eps.get(llama_cpp.NSQ_CALIB_RESOLVER_GROUP, []))
    assert [ep.value for ep in group] == ["nsq_local.calibrate:resolve"]
