"""Comparing the runs of a sweep fairly: at an equal budget on a chosen axis, averaged over seeds, with a warning
when the best setting sits at the edge of the grid. Pure functions on metrics records; no files, no figures.

* **Equal budget.** The budget is the smallest final value of the x-axis (``samples`` by default, see
  ``src.plots.X_AXES``) that every compared run reached; a run's score is its training loss at the budget,
  interpolated linearly between the progress checks around it (a warning names the runs with no check between their
  start and the budget). Runs whose last loss is not finite (diverged) never win and do not shrink the budget.
* **Seeds.** When ``seed`` is a grid key, the runs that differ only in their seed form one *setting*; a setting's
  score is the mean of its runs' scores (a diverged seed makes it +inf), and its final metrics are reported as
  mean ± sample standard deviation (n − 1 in the denominator; blank for one seed).
* **Best step size.** For a grid with ``step_size`` (two values or more): per group of the other grid keys (seed
  left out), the step size with the lowest score; a warning when it is the smallest or the largest of the grid.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from src.Sweeps.grid import PATH_KEYS, Run

TUNED = "step_size"  # the grid key whose best value is chosen per group
SEED = "seed"  # the grid key averaged over


def finite(value: Any) -> bool:
    """True for a real, finite number (not a bool, not None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def final_loss(records: Sequence[dict[str, Any]]) -> float:
    """The last recorded training loss; +inf when it is missing or not finite (a diverged run is never the best)."""
    loss = records[-1].get("loss") if records else None
    return loss if finite(loss) else math.inf


def equal_budget(curves: dict[str, list[dict[str, Any]]], x: str) -> tuple[float | None, str | None]:
    """The smallest final ``x`` reached by every run with a finite final loss, and the run that sets it.

    Returns ``(None, None)`` when no such run logged ``x``.
    """
    finals = {rid: records[-1][x] for rid, records in curves.items()
              if records and math.isfinite(final_loss(records)) and finite(records[-1].get(x))}
    if not finals:
        return None, None
    rid = min(finals, key=finals.get)
    return finals[rid], rid


def loss_at_budget(records: Sequence[dict[str, Any]], x: str, budget: float | None) -> float:
    """The training loss at ``budget`` on axis ``x``: at the progress check there, else interpolated linearly in
    ``x`` between the checks just before and just after it (the final loss when the budget is None); +inf when a
    loss it needs is not finite or no check reaches the budget."""
    if budget is None:
        return final_loss(records)
    checks = [r for r in records if finite(r.get(x))]
    before = [r for r in checks if r[x] <= budget]
    after = [r for r in checks if r[x] >= budget]
    if not before or not after:
        return math.inf
    a, b = before[-1], after[0]
    if not (finite(a.get("loss")) and finite(b.get("loss"))):
        return math.inf
    if b[x] == a[x]:
        return a["loss"]
    return a["loss"] + (b["loss"] - a["loss"]) * (budget - a[x]) / (b[x] - a[x])


def coarse_runs(curves: dict[str, list[dict[str, Any]]], x: str, budget: float | None) -> list[str]:
    """Runs with a finite loss and no progress check inside (first check, budget]: their loss at the budget is
    interpolated from their start alone (log more often: ``report_sampling_rate``)."""
    if budget is None:
        return []
    found = []
    for rid, records in curves.items():
        checks = [r[x] for r in records if finite(r.get(x))]
        if checks and math.isfinite(final_loss(records)) and not any(checks[0] < c <= budget for c in checks):
            found.append(rid)
    return found


def hashable(value: Any) -> Any:
    """A setting's value as a key: lists and dicts (``config``, ``worker_speeds``) as their JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def setting_of(run: Run, grid: dict[str, list]) -> tuple:
    """The grid values of ``run`` without its seed, as a hashable key (the same for every seed of a setting)."""
    return tuple((k, hashable(run.grid_values.get(k))) for k in grid if k != SEED)


def short_value(key: str, value: Any) -> str:
    """A value for a label: floats to 4 digits, a path by its file name."""
    if isinstance(value, float):
        return f"{value:g}"
    return Path(value).name if key in PATH_KEYS and isinstance(value, str) and value else str(value)


def describe(setting: tuple) -> str:
    """``K=1, step_size=0.01`` for a setting key."""
    return ", ".join(f"{k}={short_value(k, v)}" for k, v in setting)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n − 1); the deviation is None for fewer than two values."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class Choice:
    """The best step size of one group of settings (the other grid keys fixed) at the equal budget."""

    group: tuple  # (key, value) pairs of the other grid keys, seed left out
    value: Any  # the best step size
    score: float  # its loss at the budget (mean over seeds)
    runs: list[Run] = field(default_factory=list)  # the runs of the best setting (one per seed)
    at_edge: bool = False  # the best is the smallest or the largest step size of the grid

    @property
    def label(self) -> str:
        return describe(self.group) or "all runs"


def settings(runs: Sequence[Run], grid: dict[str, list]) -> dict[tuple, list[Run]]:
    """The runs of each setting (grid values without the seed), in grid order."""
    grouped: dict[tuple, list[Run]] = {}
    for run in runs:
        grouped.setdefault(setting_of(run, grid), []).append(run)
    return grouped


def best_step_sizes(runs: Sequence[Run], grid: dict[str, list], curves: dict[str, list[dict[str, Any]]], x: str,
                    budget: float | None) -> list[Choice]:
    """Per group of the other grid keys, the step size with the lowest mean loss at ``budget``; [] when the grid
    does not tune the step size (fewer than two values). Groups whose runs all diverged have no choice."""
    if len(grid.get(TUNED, [])) < 2:
        return []
    edges = {min(grid[TUNED]), max(grid[TUNED])}
    choices: dict[tuple, Choice] = {}
    for setting, members in settings(runs, grid).items():
        if any(run.run_id not in curves for run in members):
            continue  # a setting with a seed that logged nothing is not compared
        score = statistics.fmean(loss_at_budget(curves[r.run_id], x, budget) for r in members)
        group = tuple((k, v) for k, v in setting if k != TUNED)
        value = dict(setting)[TUNED]
        best = choices.get(group)
        if math.isfinite(score) and (best is None or score < best.score):
            choices[group] = Choice(group, value, score, list(members), value in edges)
    def grid_order(group: tuple) -> list[int]:
        listed = {k: [hashable(v) for v in grid[k]] for k, _ in group}
        return [listed[k].index(v) if v in listed[k] else len(listed[k]) for k, v in group]
    return [choices[g] for g in sorted(choices, key=grid_order)]


def edge_warnings(choices: Sequence[Choice], grid: dict[str, list]) -> list[str]:
    """One line per choice whose best step size is at the edge of the grid."""
    low, high = min(grid.get(TUNED, [0])), max(grid.get(TUNED, [0]))
    return [f"warning: {choice.label}: the best step_size {choice.value:g} is the "
            f"{'smallest' if choice.value == low else 'largest'} of the grid [{low:g} … {high:g}]; the optimum may "
            f"lie outside it: extend the grid past {choice.value:g}" for choice in choices if choice.at_edge]


def seed_rows(runs: Sequence[Run], grid: dict[str, list], finals: dict[str, dict[str, Any]],
              metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per setting: its grid values, ``n`` (runs with a final record), ``seeds``, and ``<metric>_mean`` /
    ``<metric>_std`` over the runs where the metric is finite (``<metric>_n`` of them; a diverged run's loss is
    null in its metrics file and so left out, which ``n`` vs ``<metric>_n`` shows)."""
    rows = []
    for setting, members in settings(runs, grid).items():
        done = [r for r in members if finals.get(r.run_id)]
        row: dict[str, Any] = {**dict(setting), "n": len(done),
                               "seeds": " ".join(str(r.grid_values.get(SEED)) for r in done)}
        for metric in metrics:
            values = [finals[r.run_id][metric] for r in done if finite(finals[r.run_id].get(metric))]
            mean, std = mean_std(values) if values else (None, None)
            row.update({f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_n": len(values)})
        rows.append(row)
    return rows


def mean_curve(curves: Sequence[list[dict[str, Any]]], x: str) -> list[tuple[float, float]]:
    """(x, loss) points of the mean over several seeds' curves, aligned by progress check (the seeds of one
    setting log at the same rounds): the mean x and the mean loss of each check all curves reached with a finite
    loss and a logged ``x``."""
    points = []
    for checks in zip(*curves):
        if all(finite(c.get(x)) and finite(c.get("loss")) for c in checks):
            points.append((statistics.fmean(c[x] for c in checks), statistics.fmean(c["loss"] for c in checks)))
    return points
