"""The layout holds: packages by concern in one order, no import cycles, Optuna's private names
behind one door, and `search` using only `trainers`' public names.

Read from the source (every import, including those under TYPE_CHECKING and inside functions),
so a violation fails here before it confuses a reader.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEARCH = ROOT / "search"
# Each unit may import only those before it (and itself): the leaves, then the packages.
ORDER = ["search._errors", "search._log", "search._text", "search._urls", "search._auth",
         "search._lazy", "search._process", "search.spec", "search.storage", "search.tracking",
         "search.trial", "search.integrations", "search.workers", "search.run", "search.views",
         "search._api", "search.cli"]
COMPAT = "search/storage/_compat.py"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _unit(module: str) -> str:
    """The package (or top-level module) of search that `module` belongs to."""
    for unit in ORDER:
        if module == unit or module.startswith(unit + "."):
            return unit
    if module == "search":
        return "search"
    raise AssertionError(f"{module}: not in any unit of the layout; add it to ORDER")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, `from a import b` as a.b too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            # `from package import _module` imports the module, not the package's face.
            if not all(n.rsplit(".", 1)[1].startswith("_") and _is_module(n) for n in names):
                out.append((node.lineno, node.module))
            out += [(node.lineno, n) for n in names]
    return out


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _search_modules() -> dict[str, set[str]]:
    """search module → the search modules it imports."""
    known = {_module(p) for p in _sources(SEARCH)}
    graph: dict[str, set[str]] = {}
    for path in _sources(SEARCH):
        me = _module(path)
        graph[me] = {m for _, m in _imports(path) if m in known and m != me}
    return graph


def test_packages_import_only_those_before_them() -> None:
    bad = []
    for module, imported in _search_modules().items():
        if module == "search":
            continue
        mine = ORDER.index(_unit(module))
        for other in imported:
            if other == "search":
                continue
            theirs = ORDER.index(_unit(other))
            if theirs > mine:
                bad.append(f"{module} imports {other}")
    assert not bad, "imports against the layout's order:\n" + "\n".join(sorted(bad))


def test_no_import_cycles_between_modules() -> None:
    graph = _search_modules()
    # A package's __init__ imports its own modules; those importing the package face back
    # would be a cycle too, so nothing is excused.
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" → ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_other_packages_use_a_package_through_its_public_face() -> None:
    bad = []
    for path in _sources(SEARCH):
        me = _unit(_module(path))
        for line, module in _imports(path):
            match = re.match(r"^(search\.\w+)\._\w+", module)
            if match and match.group(1) in ORDER and match.group(1) != me:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not bad, "private modules of another package:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("folder", ["search", "trainers", "benchmarks"])
def test_optuna_private_names_live_only_in_storage_compat(folder: str) -> None:
    private = re.compile(r"\boptuna(\.\w+)*\._\w+|_create_scoped_session")
    bad = []
    for path in _sources(ROOT / folder):
        if str(path.relative_to(ROOT)) == COMPAT:
            continue
        for line, module in _imports(path):
            if private.search(module):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not bad, "Optuna's private modules outside storage/_compat.py:\n" + "\n".join(bad)


def test_private_attributes_of_optuna_objects_only_in_storage() -> None:
    """`study._storage`, `trial._trial_id`, `storage._backend`… belong to the storage package."""
    attrs = re.compile(r"\.(_backend|_storage|_trial_id|_study_id|_cached_frozen_trial)\b")
    bad = []
    for path in _sources(SEARCH):
        if path.is_relative_to(SEARCH / "storage"):
            continue
        for number, text in enumerate(path.read_text().splitlines(), 1):
            code = text.split("#", 1)[0]
            if attrs.search(code.replace("self._storage", "")):
                bad.append(f"{path.relative_to(ROOT)}:{number}: {text.strip()}")
    assert not bad, "Optuna's private attributes outside search/storage:\n" + "\n".join(bad)


def test_search_uses_only_public_names_of_trainers() -> None:
    bad = []
    for path in _sources(SEARCH):
        for line, module in _imports(path):
            if re.match(r"^trainers\._", module):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module}")
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\btrainers\._\w+", text):
                bad.append(f"{path.relative_to(ROOT)}:{number}: {text.strip()}")
    assert not bad, "trainers' private modules used by search:\n" + "\n".join(sorted(set(bad)))


def test_trainers_import_neither_search_nor_optuna() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line}: {m}" for p in _sources(ROOT / "trainers")
           for line, m in _imports(p) if m.split(".")[0] in ("search", "optuna")]
    assert not bad, "\n".join(bad)


def test_trainers_modules_have_no_import_cycles() -> None:
    known = {_module(p) for p in _sources(ROOT / "trainers")}
    graph = {_module(p): {m for _, m in _imports(p) if m in known and m != _module(p)}
             for p in _sources(ROOT / "trainers") if p.name != "__init__.py"}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph.get(node, ()):
            assert nxt not in path, "import cycle: " + " → ".join(path + [nxt])
            if nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for node in graph:
        visit(node, [node])


@pytest.mark.parametrize("package", ["search.spec", "search.storage", "search.trial",
                                     "search.workers", "search.run", "search.views", "trainers"])
def test_every_package_has_a_public_face(package: str) -> None:
    import importlib

    module = importlib.import_module(package)
    assert module.__all__, f"{package} lists no public names"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names what it does not have: {missing}"


LONGEST = 80  # lines a function may run, `def` to its last line: one a reader holds in mind
RUNNER = "search/trial/_runner.py"
# `.ask()`/`.tell()` outside the runner: validate's outlook draws configs from a sampler in
# memory (no trial's life in a storage), and the storage's door to Optuna's tell, which only
# the runner calls (test_the_runner_alone_tells).
EXCUSED = {"search/spec/_study_file.py": "drawn_configs", "search/storage/_compat.py": "tell_trial"}


def _functions(folder: Path):
    for path in _sources(folder):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


@pytest.mark.parametrize("folder", ["search", "trainers"])
def test_no_function_runs_past_eighty_lines(folder: str) -> None:
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions(ROOT / folder)
            if node.end_lineno - node.lineno + 1 > LONGEST]
    assert not long, f"functions over {LONGEST} lines:\n" + "\n".join(long)


def test_a_trial_is_asked_and_told_only_by_the_runner() -> None:
    """One home for a trial's life: Optuna's ask and tell are called in the runner alone (a
    runner's own `self.ask()` is its method), and `study.optimize` nowhere."""
    bad = []
    for path, function in _functions(SEARCH):
        for node in ast.walk(function):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, receiver = node.func.attr, node.func.value
            if name == "optimize" or (
                    name in ("ask", "tell")
                    and not (isinstance(receiver, ast.Name) and receiver.id == "self")
                    and str(path) != RUNNER and EXCUSED.get(str(path)) != function.name):
                bad.append(f"{path}:{node.lineno} .{name}() in {function.name}")
    assert not bad, "a trial's life outside the runner:\n" + "\n".join(sorted(set(bad)))


def test_no_control_flow_rides_on_keyboard_interrupt() -> None:
    """Outcomes are values: no class of search derives from KeyboardInterrupt (or
    BaseException), so only a real Ctrl-C or SIGTERM travels as one."""
    bad = []
    for path in _sources(SEARCH):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")
                         for b in node.bases}
                if bases & {"KeyboardInterrupt", "BaseException", "SystemExit"}:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not bad, "control flow on KeyboardInterrupt:\n" + "\n".join(bad)


def test_the_runner_alone_tells() -> None:
    """`tell_trial`, the storage's door to Optuna's tell, is called by the runner alone."""
    callers = sorted({str(path) for path, function in _functions(SEARCH)
                      for node in ast.walk(function)
                      if isinstance(node, ast.Name) and node.id == "tell_trial"})
    assert callers == [RUNNER], callers


def test_spec_and_storage_stand_side_by_side() -> None:
    """Peers in the order: neither imports the other (a study loaded with its spec, sampler
    and pruner is `search.run`'s)."""
    bad = [f"{module} imports {other}" for module, imported in _search_modules().items()
           for other in imported
           if {_unit(module), _unit(other)} == {"search.spec", "search.storage"}]
    assert not bad, "\n".join(sorted(bad))
