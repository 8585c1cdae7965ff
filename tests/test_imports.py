"""The package's shape, checked from its import graph (every import statement, module level or not)."""
import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (ROOT / "afconvert").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "rules").glob("*.py"):
        mods["afconvert.rules" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return mods


def _graph() -> nx.DiGraph:
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("afconvert"):
                    g.add_edge(name, t)
    return g


def test_no_import_cycles():
    g = _graph()
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles


@pytest.mark.parametrize("package,allowed", [
    ("afconvert.layers", ("afconvert.layers",)),
    ("afconvert.converter", ("afconvert.converter", "afconvert.layers", "afconvert.rules")),
    ("afconvert.sources", ("afconvert.sources", "afconvert.converter", "afconvert.layers", "afconvert.atomic",
                           "afconvert.data")),
    ("afconvert.evaluation", ("afconvert.evaluation", "afconvert.layers", "afconvert.sources", "afconvert.data",
                              "afconvert.atomic", "afconvert.converter.certify", "afconvert.converter.layout")),
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
