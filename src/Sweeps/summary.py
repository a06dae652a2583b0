"""The end of a sweep: a table of every run's final metrics, a CSV of them, mean ± std over seeds, the best step
size at an equal budget (with a grid-edge warning) and the comparison figure (see :mod:`.compare` for the rules);
then the answers of :mod:`.analysis` for any logged quantity.

Files under ``<root>/figures/``: ``sweep_summary_<id>.md`` (tables and warnings), ``sweep_summary_<id>.csv`` (every
run's settings and final record), ``sweep_seeds_<id>.csv`` (when ``seed`` is a grid key), ``sweep_<id>.{pdf,png}``
(training loss), ``sweep_records_<id>.csv`` (every record of every run, measurements joined),
``sweep_<id>_<y>_vs_<x>.{pdf,png}`` (seed bands) and ``sweep_<id>_resources.{pdf,png}`` (memory and communication
per worker, when the runs communicate). Nothing here prints; ``master.py`` shows the text.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.plots import X_AXES, check_x_axis, pyplot, readable_ticks
from src.reporting import read_metrics
import src.Sweeps.analysis as analysis
import src.Sweeps.compare as cmp
from src.Sweeps.grid import Run, SweepError

TABLE_METRICS = ("samples", "loss", "test_loss", "test_accuracy")
SEED_METRICS = ("loss", "test_loss", "accuracy", "test_accuracy")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table with aligned columns."""
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def final_records(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """The last metrics record of each run ({} when it logged none)."""
    return {run.run_id: (read_metrics(run.metrics, last_only=True) or [{}])[0] for run in runs}


def summary_table(runs: list[Run], entries: dict[str, dict[str, Any]], grid: dict[str, list]) -> str:
    """A Markdown table: run id, the grid values, status, attempts, rounds and the final metrics of each run."""
    finals = final_records(runs)
    rows = [[run.run_id, *(run.grid_values.get(k, "-") for k in grid), entries[run.run_id]["status"],
             entries[run.run_id]["attempts"],
             f"{entries[run.run_id]['rounds_done']}/{entries[run.run_id]['rounds_total']}",
             *(finals[run.run_id].get(m) for m in TABLE_METRICS)] for run in runs]
    return markdown_table(["run", *grid, "status", "attempts", "rounds", *TABLE_METRICS], rows)


def csv_rows(runs: list[Run], entries: dict[str, dict[str, Any]], grid: dict[str, list]) -> list[dict[str, Any]]:
    """One row per run: run id, every key the sweep set (grid and fixed), status, stop reason, attempts, rounds,
    then every key of its final record."""
    finals = final_records(runs)
    return [{"run": run.run_id, **dict(sorted(run.overrides.items())), "status": entries[run.run_id]["status"],
             "detail": entries[run.run_id].get("detail"), "attempts": entries[run.run_id]["attempts"],
             "rounds_done": entries[run.run_id]["rounds_done"], "rounds_total": entries[run.run_id]["rounds_total"],
             **{k: v for k, v in finals[run.run_id].items() if k not in run.overrides}} for run in runs]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` with the union of their keys as columns (in order of first appearance); lists as JSON."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return path


def seed_table(rows: list[dict[str, Any]], grid: dict[str, list]) -> str:
    """Mean ± standard deviation over seeds per setting (Markdown)."""
    keys = [k for k in grid if k != cmp.SEED]
    metrics = [m for m in SEED_METRICS if any(row[f"{m}_n"] for row in rows)]

    def cell(row: dict[str, Any], m: str) -> str:
        mean, std = row[f"{m}_mean"], row[f"{m}_std"]
        text = "-" if mean is None else f"{mean:.4g}" + ("" if std is None else f" ± {std:.2g}")
        return text + (f" (n={row[f'{m}_n']})" if row[f"{m}_n"] != row["n"] else "")
    return markdown_table([*keys, "seeds", *metrics], [[row[k] for k in keys] + [row["n"]]
                                                        + [cell(row, m) for m in metrics] for row in rows])


def load_curves(runs: list[Run]) -> dict[str, list[dict[str, Any]]]:
    """Each run's metrics records, for the runs whose records carry a training loss."""
    curves = {run.run_id: read_metrics(run.metrics) for run in runs}
    return {rid: records for rid, records in curves.items() if records and "loss" in records[-1]}


def _budget_text(x: str, budget: float | None) -> str:
    if budget is None:
        return "final"
    return f"round {budget:g}" if x == "round" else f"{budget:.4g} {X_AXES[x]}"


def figure_curves(runs: list[Run], grid: dict[str, list], x: str = "samples") -> list[tuple[str, list[tuple]]]:
    """The curves of the sweep figure as (legend label, [(x, training loss), …]), in drawing order.

    With a ``step_size`` grid: per group of the other keys, the best step size at the equal budget on ``x``
    (:mod:`.compare`); otherwise every setting. A setting with several seeds is drawn as their mean curve.
    """
    check_x_axis(x)
    curves = load_curves(runs)
    budget, _ = cmp.equal_budget(curves, x)
    choices = cmp.best_step_sizes(runs, grid, curves, x, budget)
    if choices:
        shown = [(f"{c.label}, best step_size={c.value:g}" if c.group else f"best step_size={c.value:g}",
                  c.runs, c.score, c.at_edge) for c in choices]
    else:
        shown = []
        for setting, members in cmp.settings(runs, grid).items():
            members = [r for r in members if r.run_id in curves]
            if members:
                score = sum(cmp.loss_at_budget(curves[r.run_id], x, budget) for r in members) / len(members)
                shown.append((cmp.describe(setting) or members[0].run_id, members, score, False))
    result = []
    for label, members, score, at_edge in shown:
        seeds = f", mean of {len(members)} seeds" if len(members) > 1 else ""
        where = "diverged" if not math.isfinite(score) else f"final loss {score:.3g}" if budget is None else \
            f"loss {score:.3g} at {_budget_text(x, budget)}"
        result.append((f"{label} ({where}{seeds})" + (" [grid edge]" if at_edge else ""),
                       cmp.mean_curve([curves[r.run_id] for r in members], x)))
    return result


def sweep_figure(runs: list[Run], grid: dict[str, list], path: Path, title: str, x: str = "samples") -> list[Path]:
    """Training loss against ``x`` (see :func:`figure_curves` for which runs), with the equal budget as a dashed
    line; written as .pdf and .png."""
    shown = figure_curves(runs, grid, x)
    budget, _ = cmp.equal_budget(load_curves(runs), x)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    for label, points in shown:
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    if analysis.spans_decades(y for _, points in shown for _, y in points):
        ax.set_yscale("log")
    if budget is not None and shown:
        ax.axvline(budget, color="grey", linestyle="--", linewidth=1, label="equal budget")
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("training loss")
    what = "best step size per setting at equal budget" if len(grid.get("step_size", [])) > 1 else "every setting"
    ax.set_title(f"{title}: {what}", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    readable_ticks(ax)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path.with_suffix(".pdf"), path.with_suffix(".png")]
    for target in written:
        fig.savefig(target)
    plt.close(fig)
    return written


@dataclass
class Summary:
    """What :func:`write_summary` produced: the text master.py prints and the files."""

    text: str
    markdown: Path
    csv: Path
    figures: list[Path]
    seeds_csv: Path | None = None
    warnings: list[str] = field(default_factory=list)
    records_csvs: list[Path] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [self.markdown, self.csv, *([self.seeds_csv] if self.seeds_csv else []), *self.records_csvs,
                *self.figures]


def comparison_text(runs: list[Run], grid: dict[str, list], x: str) -> tuple[str, list[str]]:
    """The equal-budget paragraph (budget, the run that sets it, the best step sizes) and the grid-edge warnings."""
    curves = load_curves(runs)
    budget, limiting = cmp.equal_budget(curves, x)
    choices = cmp.best_step_sizes(runs, grid, curves, x, budget)
    if not choices:
        return "", []
    lines = [f"Best step size at an equal budget of {_budget_text(x, budget)} (the smallest that every run with a "
             f"finite loss reached; set by {limiting}; loss interpolated between the progress checks around it"
             + (", mean over seeds" if cmp.SEED in grid else "") + "):", ""]
    lines += [f"- {c.label}: step_size={c.value:g}, loss {c.score:.4g}" for c in choices]
    warnings = cmp.edge_warnings(choices, grid)
    coarse = cmp.coarse_runs(curves, x, budget)
    if coarse:
        warnings.append(f"warning: {', '.join(coarse)} logged no progress check between their start and the budget: "
                        f"their loss there is interpolated from the start; lower report_sampling_rate")
    return "\n".join(lines + [""] + warnings) + "\n", warnings


def numeric_fields(frame: Any) -> list[str]:
    """The columns of a :func:`analysis.load_sweep` table that hold numbers somewhere: what ``--y`` can be."""
    return sorted(c for c in frame.columns if frame[c].map(lambda v: isinstance(v, (int, float))
                                                           and not isinstance(v, bool)).any())


def check_y(y: str, runs: list[Run]) -> None:
    """Raises SweepError unless some run logged ``y`` as a number (naming the fields that could be drawn)."""
    frame = analysis.load_sweep(runs)
    if frame.empty or y not in numeric_fields(frame):
        fields = [] if frame.empty else [f for f in numeric_fields(frame) if f not in runs[0].H]
        raise SweepError(f"--y {y!r}: no run logged it; logged: {fields}")


def results_text(runs: list[Run], entries: dict[str, dict[str, Any]], sweep_id: str, figures: Path, y: str,
                 xs: list[str]) -> tuple[str, list[Path], list[Path]]:
    """The answers of :mod:`.analysis`: ``y`` against ``x`` with seed bands, final values, targets reached, and the
    memory and communication view when the runs communicate; returns the Markdown, the figures and the CSVs."""
    frame = analysis.load_sweep(runs, entries)
    if frame.empty:
        return "", [], []
    keys = analysis.varied_keys(frame, runs[0].H)
    if y not in numeric_fields(frame):
        return f"\nwarning: no run logged {y!r}: no figure of it\n", [], []
    drawn = [path for x in xs if x in frame
             for path in analysis.draw_curves(frame, y, x, keys, figures / f"sweep_{sweep_id}_{y}_vs_{x}",
                                              title=f"sweep {sweep_id}: {y}, mean ± std over seeds")]
    records = figures / f"sweep_records_{sweep_id}.csv"
    frame.to_csv(records, index=False)
    metrics = [m for m in dict.fromkeys([y, *SEED_METRICS]) if m in frame]
    text = (f"\nFinal values, mean ± std over seeds (varied keys {[k for k in keys if k != cmp.SEED]}):\n\n"
            + analysis.markdown(analysis.final_table(frame, keys, metrics)))
    targets = analysis.targets_table(frame, keys)
    if not targets.empty:
        text += "\nTargets (first progress check that reached each; seeds that reached it):\n\n" + \
            analysis.markdown(targets)
    link = frame.get("link_time", frame["round"] * 0).fillna(0)
    if {"n_workers", "link_latency", "link_bandwidth", "communication_delay"} & set(keys) or link.max() > 0:
        drawn += analysis.draw_resources(frame, keys, figures / f"sweep_{sweep_id}_resources",
                                         title=f"sweep {sweep_id}: memory and communication per worker")
    return text, drawn, [records]


def write_summary(runs: list[Run], entries: dict[str, dict[str, Any]], grid: dict[str, list],
                  fixed: dict[str, Any], sweep_id: str, root: Path, x: str = "samples", y: str = "loss",
                  curve_xs: list[str] | None = None) -> Summary:
    """Write the summary files of a sweep under ``root/figures`` (see the module docstring); returns them.

    Grid keys are shown in sorted order: the tracker stores the grid with sorted keys, so a summary rebuilt from it
    (``master.py --summarize``) is the same file as the one written at the end of the sweep.
    """
    figures, grid = root / "figures", dict(sorted(grid.items()))
    figures.mkdir(parents=True, exist_ok=True)
    text = summary_table(runs, entries, grid)
    seeds_csv = None
    if cmp.SEED in grid:
        rows = cmp.seed_rows(runs, grid, final_records(runs), SEED_METRICS)
        text += ("\nMean ± standard deviation over seeds (n − 1 in the denominator), final records:\n\n"
                 + seed_table(rows, grid))
        seeds_csv = write_csv(figures / f"sweep_seeds_{sweep_id}.csv", rows)
    paragraph, warnings = comparison_text(runs, grid, x)
    text += "\n" + paragraph if paragraph else ""
    markdown = figures / f"sweep_summary_{sweep_id}.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(f"# Sweep {sweep_id}\n\ngrid: `{json.dumps(grid)}`  \n"
                        f"fixed: `{json.dumps(fixed, sort_keys=True)}`  \nx-axis: `{x}`\n\n" + text)
    table_csv = write_csv(figures / f"sweep_summary_{sweep_id}.csv", csv_rows(runs, entries, grid))
    drawn = sweep_figure(runs, grid, figures / f"sweep_{sweep_id}", f"sweep {sweep_id}", x)
    results, more, csvs = results_text(runs, entries, sweep_id, figures, y, curve_xs or [x])
    if results:
        with open(markdown, "a") as f:
            f.write(results)
    return Summary(text + results, markdown, table_csv, drawn + more, seeds_csv, warnings, csvs)
