"""The package's shape, checked from its import graph (every import statement, module level or not)."""
import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for path in (root / "afconvert").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (root / "rules").glob("*.py"):
        mods["afconvert.rules" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return mods


_DYNAMIC = {"import_module", "__import__"}   # importlib.import_module(name), __import__(name)


def _dynamic_targets(tree: ast.AST, mods: dict[str, Path]) -> list[str]:
    """What a module may import by name at run time: for each ``import_module`` / ``__import__`` call, the
    module a string argument names, every module under an f-string's literal prefix, and (a name computed
    from data) every module named by a string constant of the file (lazy-export tables)."""
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args
             and getattr(n.func, "attr", getattr(n.func, "id", None)) in _DYNAMIC]
    out = []
    for call in calls:
        arg = call.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            out.append(arg.value)
        elif isinstance(arg, ast.JoinedStr):
            head = arg.values[0]
            prefix = head.value if isinstance(head, ast.Constant) else ""
            out += [m for m in mods if prefix and m.startswith(prefix)]
        else:
            consts = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            out += [m for m in mods if m in consts or any(m.startswith(c + ".") for c in consts if c in mods)]
    return out


def _graph(root: Path = ROOT) -> nx.DiGraph:
    """Every import edge between the package's modules: import statements anywhere in a file (module level
    or inside functions) and dynamic imports by name (``_dynamic_targets``)."""
    mods = _modules(root)
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        targets = _dynamic_targets(tree, mods)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("afconvert."):
                g.add_edge(name, t)   # not to the root: it is initialised before any module under it
    return g


def test_no_import_cycles():
    g = _graph()
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles


@pytest.mark.parametrize("how", ["return importlib.import_module('afconvert.b')",
                                 "return importlib.import_module(f'afconvert.{n}')",
                                 "return importlib.import_module(TABLE[n])", "from afconvert import b"])
def test_the_cycle_check_sees_dynamic_imports(tmp_path, how):
    """A two-module package whose cycle closes through a dynamic import (by literal, f-string, or a lazy
    table) is caught as a static one is."""
    (tmp_path / "afconvert").mkdir()
    (tmp_path / "afconvert" / "__init__.py").write_text("")
    (tmp_path / "afconvert" / "a.py").write_text("import importlib\nTABLE = {'b': 'afconvert.b'}\n\n"
                                                 f"def f(n):\n    {how}\n")
    (tmp_path / "afconvert" / "b.py").write_text("from afconvert import a\n")
    assert ("afconvert.a", "afconvert.b") in _graph(tmp_path).edges
    assert list(nx.simple_cycles(_graph(tmp_path)))


@pytest.mark.parametrize("package,allowed", [
    ("afconvert.layers", ("afconvert.layers", "afconvert.settings")),
    ("afconvert.converter", ("afconvert.converter", "afconvert.layers", "afconvert.rules", "afconvert.settings")),
    ("afconvert.sources", ("afconvert.sources", "afconvert.converter", "afconvert.layers", "afconvert.atomic",
                           "afconvert.data")),
    ("afconvert.evaluation", ("afconvert.evaluation", "afconvert.layers", "afconvert.sources", "afconvert.data",
                              "afconvert.atomic", "afconvert.settings", "afconvert.converter.certify",
                              "afconvert.converter.layout")),
    ("afconvert.rules", ("afconvert.rules", "afconvert.layers", "afconvert.converter.rule",
                         "afconvert.converter.layout", "afconvert.converter.calibrate")),
])
def test_each_role_imports_only_what_it_builds_on(package, allowed):
    """layers/ import nothing from the converter, evaluation or CLI; no role imports the CLI."""
    g = _graph()
    bad = [(a, b) for a, b in g.edges if (a == package or a.startswith(package + ".")) and b != "afconvert"
           and not any(b == p or b.startswith(p + ".") for p in allowed)]  # the root: __version__, lazy names
    assert not bad, bad


def test_cli_starts_without_torch():
    """`afconvert --help` and a misspelled model name answer before torch is imported."""
    code = ("import sys; from afconvert.cli import main\n"
            "rc = main(['convnext_tinny', '--no-pretrained', '--out', 'x.pt'])\n"
            "assert rc == 2 and 'torch' not in sys.modules, (rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "unknown timm model 'convnext_tinny'" in proc.stderr and "convnext_tiny" in proc.stderr


def test_no_function_in_the_library_is_longer_than_80_lines():
    """Long functions hide phases: each is split into named steps (as ``convert`` is into analyse, plan,
    apply and report)."""
    root = ROOT / "afconvert"
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(root.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long
