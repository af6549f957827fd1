"""Structure checks any reader can redo: no import circle among blockrep/ modules (imports
inside functions count too: a deferred import is still a circle), and shell/node.py stays
small."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "blockrep")


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py under blockrep/."""
    found = {}
    for dirpath, _dirs, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = path
    return found


def imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """The blockrep modules that module `name` imports, anywhere in its body."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target in known:
                out.add(target)
            for alias in node.names:  # `from . import verify`: a module, not a name
                sub = f"{target}.{alias.name}"
                if sub in known:
                    out.add(sub)
    out.discard(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_the_graph_sees_relative_and_deferred_imports():
    g = import_graph()
    assert "blockrep.state" in g["blockrep.shell.node"]          # from .. import state
    assert "blockrep.shell.verify" in g["blockrep.shell.node"]   # from .verify import ...
    assert "blockrep.shell.admin" in g["blockrep.cli"]           # inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_among_blockrep_modules():
    assert cycles(import_graph()) == []


def test_node_py_stays_small():
    """node.py keeps the life cycle, the packet table and the state setters (admin.py,
    connect.py, verify.py and the resync modules hold the rest)."""
    with open(os.path.join(PKG, "shell", "node.py")) as f:
        n = sum(1 for _ in f)
    assert n <= 500, f"blockrep/shell/node.py has {n} lines"


def test_no_shell_module_is_large():
    """Every module of the shell stays readable in one sitting (about 500 lines; this
    catches the drift beyond it)."""
    sizes = {}
    for name in sorted(os.listdir(os.path.join(PKG, "shell"))):
        if name.endswith(".py"):
            with open(os.path.join(PKG, "shell", name)) as f:
                sizes[name] = sum(1 for _ in f)
    big = {k: v for k, v in sizes.items() if v > 600}
    assert not big, f"shell modules over 600 lines: {big}"


# -- NBD constants stay behind the NBD boundary ------------------------------------------------

NBD_BOUNDARY = ("blockrep.nbd", "blockrep.shell.nbd_server", "blockrep.shell.nbd_session",
                "blockrep.shell.nbd_reads",
                "blockrep.faults.writer")  # the core, its front end, the soak's NBD client
NBD_NAMES = {"CmdFlag", "NbdCmd", "TransmissionFlag", "ClientFlag", "HandshakeFlag"}


def nbd_leaks(name: str, path: str) -> list[str]:
    """Uses of NBD constants in module `name`: imports of blockrep.nbd.constants or of its
    flag/command types, and bit tests of a `flags` value against a bare number
    (`flags & 1` is NBD's FUA leaking through as an int)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = package.split(".")
                mod = ".".join(parts[:len(parts) - node.level + 1] + ([mod] if mod else []))
            if mod == "blockrep.nbd.constants" or (
                    mod.startswith("blockrep.nbd") and {a.name for a in node.names} & NBD_NAMES):
                out.append(f"{path}:{node.lineno}: imports {mod}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd):
            sides = (node.left, node.right)
            named = any(isinstance(s, ast.Name) and "flags" in s.id for s in sides)
            number = any(isinstance(s, ast.Constant) and isinstance(s.value, int)
                         for s in sides)
            if named and number:
                out.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_nbd_flag_constants_outside_the_nbd_boundary():
    leaks = []
    for name, path in sorted(modules().items()):
        if not name.startswith(NBD_BOUNDARY):
            leaks += nbd_leaks(name, path)
    assert leaks == []


def test_the_nbd_check_sees_a_leak(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("from ..nbd.constants import CmdFlag\n"
                 "def f(flags):\n    return flags & 1\n")
    assert len(nbd_leaks("blockrep.shell.m", str(p))) == 2
