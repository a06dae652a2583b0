"""The floor plan: imports only go down (data/models + ground floor → frames/plugins → loop → engines → sweeps →
scripts), there is no import circle, and files stay readable. See docs/architecture.md."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUND = ("src.cli", "src.blocks", "src.batch_probe", "src.records", "src.reporting", "src.plots", "src.utils")


def layer(module: str) -> int:
    """The floor of a project module (higher floors may import lower ones, never the reverse)."""
    if module.startswith(("src.Data", "src.Architectures")) or module in GROUND or module == "src":
        return 0
    if module.startswith("src.Buliding_Units") or module == "src.Optimizer_Engines":  # plugins, frames, engine table
        return 1
    if module == "src.Optimizer_Engines.loop":
        return 2
    if module.startswith("src.Optimizer_Engines"):
        return 3
    if module.startswith("src.Sweeps"):
        return 4
    if module in ("dol1", "master"):
        return 5
    raise AssertionError(f"{module} has no floor in tests/test_architecture.py: give it one")


def project_modules() -> dict[str, Path]:
    mods = {}
    for path in list((ROOT / "src").rglob("*.py")) + [ROOT / "dol1.py", ROOT / "master.py"]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def imports_of(path: Path, mods: dict[str, Path], name: str) -> set[str]:
    """Project modules imported anywhere in the file (inside functions too), resolved to module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in mods else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.add(str(node.args[0].value))  # importlib.import_module("src.x") is an import too
    return {m for m in found if m in mods and m != name}


def test_imports_only_go_down_and_never_circle():
    mods = project_modules()
    graph = {name: imports_of(path, mods, name) for name, path in mods.items()}
    upward = [f"{a} (floor {layer(a)}) imports {b} (floor {layer(b)})"
              for a, deps in graph.items() for b in deps if layer(b) > layer(a)]
    assert upward == []

    def visit(node, stack):
        for nxt in graph[node]:
            assert nxt not in stack, "import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt])
            visit(nxt, stack + [nxt])
    for name in graph:
        visit(name, [name])


def test_the_checker_sees_an_upward_import(tmp_path):
    fake = tmp_path / "mod.py"
    fake.write_text("import importlib\n\n\ndef f():\n    from src.Optimizer_Engines.BCD_engine import train_entire\n"
                    "    return importlib.import_module('src.Sweeps.grid')\n")
    mods = project_modules()
    deps = imports_of(fake, mods, "src.reporting")
    assert deps == {"src.Optimizer_Engines.BCD_engine", "src.Sweeps.grid"}
    assert layer("src.Optimizer_Engines.BCD_engine") > 0 and layer("src.Sweeps.grid") > 0


@pytest.mark.parametrize("name,path", sorted(project_modules().items()))
def test_files_and_functions_stay_readable(name, path):
    text = path.read_text()
    tree = ast.parse(text)
    n_lines = len(text.splitlines())
    assert n_lines <= 400, f"{path} has {n_lines} lines, over 400"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 50]
    assert long == [], f"{path}: functions over ~50 lines"
