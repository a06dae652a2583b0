"""The floor plan (docs/architecture.md): a small core in the seed's own files, wings around it that load only when
used. The ring test reads every import of src/, dol1.py and master.py (imports inside functions included); a plain
run is checked to import no wing; the core's size is printed, not asserted."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WINGS = ("src.Optimizer_Engines.parallel", "src.Buliding_Units.hessian", "src.Runs", "src.Sweeps")
SCRIPTS = ("master",)  # above everything: may import any module
# The named seams: the only imports that cross the ring outside the lazy tables (engine table, WING_UNITS, utils).
SEAMS = {
    ("dol1", "src.Runs.resume"): "--resume and --settings_file",
    ("dol1", "src.Runs.checkpoint"): "--checkpoint_every > 0",
    ("dol1", "src.Runs.tensorboard"): "--tensorboard true",
    ("dol1", "src.Runs.reopen"): "--measure_only, dol1.load_run",
    ("dol1", "src.Optimizer_Engines.parallel.ddp_engine"): "srun's task count, only under SLURM",
    ("src.Optimizer_Engines.parallel", "src.Runs.state"): "every rank's RNG and block copies for a checkpoint",
}


def wing_of(module: str) -> str | None:
    return next((w for w in WINGS if module == w or module.startswith(w + ".")), None)


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


def seam(a: str, b: str) -> bool:
    return any((a == x or a.startswith(x + ".")) and (b == y or b.startswith(y + ".")) for x, y in SEAMS)


def crossings(graph: dict[str, set[str]]) -> list[str]:
    """Imports that break the ring: core → wing, or wing → another wing, outside the named seams."""
    bad = []
    for a, deps in graph.items():
        for b in deps:
            if a in SCRIPTS or wing_of(b) is None or wing_of(b) == wing_of(a) or seam(a, b):
                continue
            bad.append(f"{a} ({wing_of(a) or 'core'}) imports {b} ({wing_of(b)})")
    return sorted(bad)


def test_the_ring_core_imports_no_wing_and_wings_only_the_core_and_named_seams():
    mods = project_modules()
    graph = {name: imports_of(path, mods, name) for name, path in mods.items()}
    assert crossings(graph) == []
    used = {(a, b) for a, deps in graph.items() for b in deps if seam(a, b) and wing_of(b) != wing_of(a)}
    assert all(any(a == x or a.startswith(x + ".") for a, _ in used) for x, _ in SEAMS)  # no stale seam

    def visit(node, stack):
        for nxt in graph[node]:
            assert nxt not in stack, "import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt])
            visit(nxt, stack + [nxt])
    for name in graph:
        visit(name, [name])


def test_the_checker_sees_a_core_module_importing_a_wing(tmp_path):
    fake = tmp_path / "mod.py"
    fake.write_text("import importlib\n\n\ndef f():\n    from src.Runs.checkpoint import Checkpointer\n"
                    "    return importlib.import_module('src.Sweeps.grid')\n")
    deps = imports_of(fake, project_modules(), "src.reporting")
    assert deps == {"src.Runs.checkpoint", "src.Sweeps.grid"}
    assert crossings({"src.reporting": deps}) == [
        "src.reporting (core) imports src.Runs.checkpoint (src.Runs)", "src.reporting (core) imports src.Sweeps.grid "
        "(src.Sweeps)"]
    assert crossings({"src.Sweeps.grid": {"src.Runs.checkpoint"}}) != []  # wing → wing without a seam


def test_the_lazy_tables_name_modules_that_exist():
    from src.Buliding_Units.MeasurementUnit import WING_UNITS
    from src.Optimizer_Engines import ENGINES
    from src.utils import _SEED_NAMES
    mods = project_modules()
    paths = [spec.path.rpartition(".")[0] for spec in ENGINES.values()] + list(WING_UNITS.values()) + \
        [p.rpartition(".")[0] for spec in ENGINES.values() for p in (spec.torchrun_worker, spec.torchrun_path,
                                                                     spec.check) if isinstance(p, str)] + \
        list(_SEED_NAMES.values())
    assert [p for p in paths if p not in mods] == []


PLAIN_RUN = """
import json, runpy, sys
sys.argv = ["dol1.py"] + sys.argv[1:]
try:
    runpy.run_path("dol1.py", run_name="__main__")
except SystemExit as err:
    assert not err.code, err.code
print("MODULES", json.dumps(sorted(m for m in sys.modules if m == "dol1" or m.startswith("src"))))
"""


@pytest.mark.slow
def test_a_plain_run_imports_no_wing_and_the_core_size_is_reported(tmp_path, capsys):
    units = tmp_path / "empty.txt"
    units.write_text("# no plugins\n")
    out = subprocess.run([sys.executable, "-c", PLAIN_RUN, "--units_file", str(units), "--checkpoint_every", "0",
                          "--rounds", "2", "--eval_samples", "64", "--output_root", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    modules = json.loads(out.stdout.split("MODULES", 1)[1])
    assert [m for m in modules if wing_of(m)] == []
    mods = project_modules()
    sizes = {m: len(mods["dol1" if m == "__main__" else m].read_text().splitlines()) for m in modules if m in mods}
    sizes["dol1"] = len((ROOT / "dol1.py").read_text().splitlines())
    with capsys.disabled():
        print(f"\ncore size: a plain run imports {sum(sizes.values())} lines in {len(sizes)} project files")
        for m, n in sorted(sizes.items(), key=lambda kv: -kv[1]):
            print(f"  {n:5d}  {m}")
