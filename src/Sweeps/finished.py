"""A finished sweep read back from its tracker alone (``master.py --summarize TRACKER``): its runs, their tracker
entries, its grid and fixed settings, without expanding the grid again or running anything."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from src.Sweeps.grid import Run, Spec, SweepError

RUN_FIELDS = ("overrides", "H", "argv", "report")  # what the scheduler stores per run that a summary needs


def _run(run_id: str, entry: dict[str, Any], grid: dict[str, list]) -> Run:
    missing = [k for k in RUN_FIELDS if k not in entry]
    if missing or not isinstance(entry.get("overrides"), dict) or not set(grid) <= set(entry["overrides"]):
        raise SweepError(f"the tracker's entry of run {run_id} lacks {missing or 'its grid values'}: it was not "
                         f"written by master.py's scheduler, or is damaged")
    return Run(run_id, entry["overrides"], {k: entry["overrides"][k] for k in grid}, entry["argv"], entry["H"],
               Path(entry["report"]).parent)


def sweeps_in_tracker(data: dict[str, Any]) -> dict[str, tuple[list[Run], dict[str, Any], dict, dict]]:
    """Every sweep of a tracker's content (``read_tracker``): sweep id -> (runs, their entries, grid, fixed).

    Raises:
        SweepError: the tracker holds no sweep, or a sweep names a run it has no usable entry for.
    """
    if not data["sweeps"]:
        raise SweepError("the tracker holds no sweep (master.py records one when it starts a sweep)")
    found = {}
    for sweep_id, sweep in sorted(data["sweeps"].items()):
        grid, fixed, names = sweep.get("grid"), sweep.get("fixed"), sweep.get("runs")
        if not isinstance(grid, dict) or not isinstance(fixed, dict) or not isinstance(names, list):
            raise SweepError(f"sweep {sweep_id} in the tracker lacks its grid, fixed settings or runs")
        unknown = [rid for rid in names if rid not in data["runs"]]
        if unknown:
            raise SweepError(f"sweep {sweep_id} names runs the tracker has no entry for: {unknown}")
        varied = Spec(grid, fixed, list(sweep.get("zip") or [])).varied
        runs = [_run(rid, data["runs"][rid], varied) for rid in names]
        found[sweep_id] = (runs, {rid: data["runs"][rid] for rid in names}, varied, fixed)
    return found
