"""The grid of a sweep: its specification, its runs (each a ``dol1.py`` command line) and their ids.

A sweep is the Cartesian product of a grid of ``dol1.py`` settings, with fixed settings applied to every run. Each
run is one ``dol1.py`` process; its run id is the one ``dol1.py`` gives its resolved configuration (the experiment
settings and the units file's text, not where it runs), the name of its report.
"""
from __future__ import annotations

import difflib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from src.cli import ConfigError
from src.reporting import Paths, run_id


class SweepError(ConfigError):
    """Bad sweep input (grid, fixed settings, sweep file, tracker file): master.py exits with status 2."""


MASTER_KEYS = {  # dol1.py keys the master sets itself, or cannot honour for a sweep
    "resume": "master.py resumes every attempt from its checkpoint itself (resume=auto)",
    "measure_only": "a sweep trains; measure a finished run with python dol1.py --measure_only R<hash>"}


@dataclass
class Run:
    """One run of a sweep: its overrides, the dol1.py arguments and the resolved configuration ``H``."""

    run_id: str
    overrides: dict[str, Any]  # fixed settings + this grid point
    grid_values: dict[str, Any]  # this grid point only (the table's columns)
    argv: list[str]
    H: dict[str, Any]
    reports_dir: Path

    @property
    def report(self) -> Path:
        return self.reports_dir / f"{self.run_id}.txt"

    @property
    def metrics(self) -> Path:
        return self.reports_dir / f"{self.run_id}.metrics.jsonl"

    @property
    def log(self) -> Path:
        """stdout and stderr of every attempt, appended (one header line per attempt)."""
        return self.reports_dir / f"{self.run_id}.log"


@dataclass
class Spec:
    """A sweep: ``grid`` (key -> values, crossed), ``linked`` (settings blocks that vary together, crossed with the
    grid: ``"zip": [{"model": "mlp", "config": [64]}, {"model": "residual_cnn", "config": [16, 32]}]``), ``fixed``
    (every run) and ``summary`` (the sweep file's defaults for ``--y`` and ``--x``)."""

    grid: dict[str, list]
    fixed: dict[str, Any]
    linked: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def varied(self) -> dict[str, list]:
        """Every key the sweep varies with its values: the grid's, then the linked blocks' (tables' columns)."""
        linked: dict[str, list] = {}
        for block in self.linked:
            for key, value in block.items():
                if value not in linked.setdefault(key, []):
                    linked[key].append(value)
        return {**self.grid, **linked}

    def points(self) -> list[dict[str, Any]]:
        """Every run's varied settings: the grid's product, crossed with each linked block."""
        return [{**dict(zip(self.grid, point)), **block}
                for point in itertools.product(*self.grid.values()) for block in (self.linked or [{}])]


PATH_KEYS = ("units_file", "settings_file", "data_root", "output_root")  # relative to the sweep file, in one


def load_spec(grid: str | None = None, fixed: str | None = None, sweep_file: str | Path | None = None,
              linked: str | None = None) -> Spec:
    """Read a sweep: from a JSON sweep file (``grid``, ``fixed``, ``zip``, ``summary``), then from JSON strings
    (which override its grid and fixed keys; ``linked`` replaces its ``zip``).

    Raises:
        SweepError: unreadable JSON, a grid value that is not a non-empty list, a linked block that is not an object
            (or whose keys differ between blocks), a key set twice.
    """
    def parse(text: str, what: str, kind: type = dict) -> Any:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise SweepError(f"{what} is not valid JSON ({err}): {text!r}") from err
        if not isinstance(value, kind):
            raise SweepError(f"{what} must be a JSON {'object' if kind is dict else 'list'}, got {text!r}")
        return value

    spec: dict[str, Any] = {}
    if sweep_file:
        if not Path(sweep_file).is_file():
            raise SweepError(f"sweep file {str(sweep_file)!r} is not a file")
        try:
            spec = parse(Path(sweep_file).read_text(encoding="utf-8"), f"sweep file {str(sweep_file)!r}")
        except (OSError, UnicodeDecodeError) as err:
            raise SweepError(f"cannot read sweep file {str(sweep_file)!r}: {err}") from err
        unknown = sorted(set(spec) - {"grid", "fixed", "zip", "summary", "about"})
        if unknown:
            raise SweepError(f"sweep file {str(sweep_file)!r}: unknown parts {unknown}; valid: ['about', 'fixed', "
                             f"'grid', 'summary', 'zip']")
        if set(spec.get("summary") or {}) - {"y", "x"}:
            raise SweepError(f"sweep file {str(sweep_file)!r}: unknown summary keys "
                             f"{sorted(set(spec['summary']) - {'y', 'x'})}; valid: ['x', 'y']")
        for part, kind in (("grid", dict), ("fixed", dict), ("zip", list), ("summary", dict)):
            if spec.get(part) is not None and not isinstance(spec[part], kind):
                raise SweepError(f"sweep file {str(sweep_file)!r}: {part!r} must be a JSON "
                                 f"{'object' if kind is dict else 'list'}, got {spec[part]!r}")
        spec = _relative_to(spec, Path(sweep_file).resolve().parent)
    grid_spec = dict(spec.get("grid") or {}) | (parse(grid, "--grid") if grid else {})
    fixed_spec = dict(spec.get("fixed") or {}) | (parse(fixed, "--fixed") if fixed else {})
    blocks = parse(linked, "--zip", list) if linked else list(spec.get("zip") or [])
    for key, values in grid_spec.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid values must be non-empty lists: {key!r} has {values!r}")
    if not all(isinstance(b, dict) and b for b in blocks) or len({tuple(sorted(b)) for b in blocks}) > 1:
        raise SweepError(f"'zip' must be a list of settings blocks with the same keys, e.g. [{{\"model\": \"mlp\", "
                         f"\"config\": [64]}}, {{\"model\": \"cnn\", \"config\": [16]}}]; got {blocks!r}")
    linked_keys = set(blocks[0]) if blocks else set()
    for key, value in [(k, v) for k, vs in grid_spec.items() for v in vs] + list(fixed_spec.items()) + \
            [(k, v) for b in blocks for k, v in b.items()]:
        if "\\u0000" in json.dumps(value):  # a command line cannot carry a NUL character
            raise SweepError(f"{key!r}: the value {value!r} contains a NUL character")
    for first, second, names in ((grid_spec, fixed_spec, "the grid and in the fixed settings"),
                                 (grid_spec, linked_keys, "the grid and in 'zip'"),
                                 (fixed_spec, linked_keys, "the fixed settings and in 'zip'")):
        both = sorted(set(first) & set(second))
        if both:
            raise SweepError(f"keys both in {names}: {both}" + (" (a sweep file's 'zip' is replaced whole by --zip: "
                             "give them there)" if "zip" in names else ""))
    return Spec(grid_spec, fixed_spec, blocks, dict(spec.get("summary") or {}))


def _relative_to(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A sweep file's relative ``units_file``/``settings_file``/``data_root`` made relative to the file's folder."""
    def fix(settings: dict[str, Any], listed: bool) -> dict[str, Any]:
        return {k: ([_resolve_path(x, folder) for x in v] if listed and isinstance(v, list) else
                    v if listed else _resolve_path(v, folder)) if k in PATH_KEYS else v for k, v in settings.items()}
    return {**spec, "grid": fix(spec.get("grid") or {}, True), "fixed": fix(spec.get("fixed") or {}, False),
            "zip": [fix(b, False) if isinstance(b, dict) else b for b in spec.get("zip") or []]}


def _resolve_path(value: Any, folder: Path) -> Any:
    return str((folder / value).resolve()) if isinstance(value, str) and value and not Path(value).is_absolute() \
        else value


def sweep_hash(grid: Mapping[str, Any], fixed: Mapping[str, Any], linked: list | None = None) -> str:
    """``S`` + 8 hex digits naming a sweep (its summary files and its entry in the tracker)."""
    return "S" + run_id({"grid": grid, "fixed": fixed, **({"zip": linked} if linked else {})})[1:]


def to_argv(overrides: Mapping[str, Any]) -> list[str]:
    """dol1.py arguments ``--key=value``: strings as they are, everything else as a Python literal (``repr``).

    The ``=`` form keeps values that start with ``-`` from being read as flags; ``repr`` round-trips lists, None and
    booleans through dol1.py's literal parser.
    """
    return [f"--{key}={value if isinstance(value, str) else repr(value)}" for key, value in overrides.items()]


def expand(grid: Mapping[str, list] | Spec, fixed: Mapping[str, Any] | None, resolve: Callable[[list[str]], dict[str, Any]],
           valid_keys: Sequence[str], project_root: Path,
           identify: Callable[[dict[str, Any]], str] = run_id, always: Mapping[str, Any] | None = None) -> list[Run]:
    """Every run of the grid × linked blocks × fixed product, checked with dol1.py's own parser before anything
    starts.

    Args:
        grid: key -> list of values, or a :class:`Spec` (then ``fixed`` is its own).
        fixed: key -> value for every run.
        resolve: dol1.py's ``resolve_config(argv) -> H``; raises ConfigError (or SystemExit from argparse).
        valid_keys: dol1.py's keys (unknown keys are refused here, with a did-you-mean).
        project_root: where dol1.py writes when ``output_root`` is empty.
        identify: H -> run id, as dol1.py computes it (``dol1.run_identity``).
        always: settings every run gets unless the sweep sets them (master.py: ``resume="auto"``, so a retried
            attempt continues from its checkpoint).

    Returns:
        The runs in grid order.

    Raises:
        SweepError: an unknown key, a key the master sets itself, a value dol1.py rejects (its message, with the
            run's overrides), an output root that cannot be written, a grid value listed twice, or two grid points
            that are one experiment.
    """
    spec = grid if isinstance(grid, Spec) else Spec(dict(grid), dict(fixed or {}))
    grid, fixed = spec.varied, spec.fixed
    for key in [*grid, *fixed]:
        if key not in valid_keys:
            close = difflib.get_close_matches(key, valid_keys, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SweepError(f"unknown dol1.py key {key!r}.{hint} Valid: {sorted(valid_keys)}")
        if key in MASTER_KEYS:
            raise SweepError(f"{key!r} cannot be set in a sweep: {MASTER_KEYS[key]}")
    for key, values in spec.grid.items():  # 0 and 0.0, or one value twice: one run planned where two were asked
        repeated = [v for i, v in enumerate(values)
                    if any(v == w and isinstance(v, bool) == isinstance(w, bool) for w in values[:i])]
        if repeated:
            raise SweepError(f"grid key {key!r} lists {repeated[0]!r} twice ({values!r}): a value is one run; list "
                             f"each value once")
    runs: dict[str, Run] = {}
    for grid_values in spec.points():
        overrides = {**fixed, **grid_values}
        argv = to_argv({**{k: v for k, v in (always or {}).items() if k not in overrides}, **overrides})
        try:
            H = resolve(argv)
            rid = identify(H)
        except ConfigError as err:
            raise SweepError(f"run {overrides}: {err}") from err
        paths = Paths.for_output_root(H["output_root"]) if H["output_root"] else Paths(project_root)
        try:
            paths.check_writable()
        except ConfigError as err:
            raise SweepError(f"run {overrides}: {err}") from err
        same = [k for k in grid if rid in runs and runs[rid].grid_values[k] != grid_values[k]]
        if same:  # two grid points, one experiment: the sweep would silently run (and report) fewer runs
            raise SweepError(f"the grid's points {runs[rid].grid_values} and {grid_values} are one run ({rid}): "
                             f"{same} does not change the experiment for these settings (it says where or how a run "
                             f"executes, or does not apply to --training_mode {H['training_mode']} or --model "
                             f"{H['model']}). Put {same[0]!r} in --fixed, or vary 'tag' with it (a linked grid)")
        runs.setdefault(rid, Run(rid, overrides, grid_values, argv, H, paths.reports))  # a repeated value: one run
    return list(runs.values())
