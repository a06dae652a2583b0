"""The end of a sweep: a table of every run's final metrics and the comparison figure.

Nothing here prints; ``master.py`` shows the table.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from src.plots import pyplot
from src.reporting import read_metrics
from src.Sweeps.grid import Run

TABLE_METRICS = ("loss", "test_loss", "test_accuracy")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)


def summary_table(runs: list[Run], entries: dict[str, dict[str, Any]], grid: dict[str, list]) -> str:
    """A Markdown table: run id, the grid values, status, attempts, rounds and the final metrics of each run."""
    header = ["run", *grid, "status", "attempts", "rounds", *TABLE_METRICS]
    rows = []
    for run in runs:
        entry = entries[run.run_id]
        last = (read_metrics(run.metrics, last_only=True) or [{}])[0]
        rows.append([run.run_id, *(run.grid_values[k] for k in grid), entry["status"], entry["attempts"],
                     f"{entry['rounds_done']}/{entry['rounds_total']}", *(last.get(m) for m in TABLE_METRICS)])
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _final_loss(records: list[dict[str, Any]]) -> float:
    """The last recorded training loss; +inf when it is missing or not finite (a diverged run is never the best)."""
    loss = records[-1].get("loss") if records else None
    return loss if _finite(loss) else math.inf


def figure_curves(runs: list[Run], grid: dict[str, list]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The curves of the sweep figure as (legend label, metrics records), in the order they are drawn.

    For a step_size × K grid: per K, the run with the lowest final training loss (non-finite losses lose); else
    every run that recorded a loss.
    """
    curves = {run.run_id: read_metrics(run.metrics) for run in runs}
    curves = {rid: records for rid, records in curves.items() if records and "loss" in records[-1]}
    if {"step_size", "K"} <= set(grid):
        best: dict[Any, Any] = {}
        for run in runs:
            K = run.grid_values["K"]
            if run.run_id in curves and (K not in best or _final_loss(curves[run.run_id])
                                         < _final_loss(curves[best[K].run_id])):
                best[K] = run
        shown = [(f"K={K}, best step_size={run.grid_values['step_size']:g}", run) for K, run in sorted(best.items())]
    else:
        shown = [(", ".join(f"{k}={v}" for k, v in run.grid_values.items()) or run.run_id, run)
                 for run in runs if run.run_id in curves]
    finals = {run.run_id: _final_loss(curves[run.run_id]) for _, run in shown}
    return [(f"{label} (" + (f"final {finals[run.run_id]:.3g}" if math.isfinite(finals[run.run_id]) else "diverged")
             + ")", curves[run.run_id]) for label, run in shown]


def sweep_figure(runs: list[Run], grid: dict[str, list], path: Path, title: str) -> list[Path]:
    """Loss against rounds (see :func:`figure_curves` for which runs), written as .pdf and .png."""
    shown = figure_curves(runs, grid)
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, records in shown:
        points = [(r["round"], r["loss"]) for r in records if _finite(r.get("loss"))]  # diverged: NaN or inf
        ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    if shown and all(r["loss"] > 0 for _, records in shown for r in records if _finite(r.get("loss"))):
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("training loss")
    what = "best step size per K (lowest final training loss)" if {"step_size", "K"} <= set(grid) else "every run"
    ax.set_title(f"{title}: {what}", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    if shown:
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path.with_suffix(".pdf"), path.with_suffix(".png")]
    for target in written:
        fig.savefig(target)
    plt.close(fig)
    return written


def write_summary(runs: list[Run], entries: dict[str, dict[str, Any]], grid: dict[str, list],
                  fixed: dict[str, Any], sweep_id: str, root: Path) -> tuple[str, Path, list[Path]]:
    """Write ``figures/sweep_summary_<id>.md`` and ``figures/sweep_<id>.{pdf,png}`` under ``root``.

    Returns:
        The Markdown table, the summary file and the figure files.
    """
    table = summary_table(runs, entries, grid)
    summary = root / "figures" / f"sweep_summary_{sweep_id}.md"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(f"# Sweep {sweep_id}\n\ngrid: `{json.dumps(grid)}`  \nfixed: `{json.dumps(fixed)}`\n\n"
                       + table)
    figure = sweep_figure(runs, grid, root / "figures" / f"sweep_{sweep_id}", f"sweep {sweep_id}")
    return table, summary, figure
