"""From a sweep's runs to answers: one table of every record of every run, curves of any logged quantity with a
mean ± std band over seeds, final values, targets reached, and the memory and communication view.

* :func:`load_sweep` — a pandas DataFrame, one row per run × record: the run's id and status, every setting of the
  run as a column (lists and dicts as JSON text), every field of its progress records, and the scalar fields of its
  measurement logs (``measurements/<Unit>_<run>.jsonl``) joined on the round (``coupling_max``, ``total_MB``, …;
  their x-axis values are interpolated from the progress records around that round).
* A *setting* is a run's values of the keys that vary across the runs, seed left out; its seeds are averaged.
  Curves are averaged check by check (the same round in every seed); the x value drawn is the seeds' mean.

Nothing here prints or writes except the ``draw_*`` and ``write_*`` functions, which return the files they wrote.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from src.plots import X_AXES, pyplot, readable_ticks, save_figure
from src.reporting import read_metrics, read_report
from src.Sweeps.compare import short_value
from src.Sweeps.grid import Run

SEED = "seed"
KEEP_AS_TEXT = (list, dict, tuple)
X_FOR_MEASUREMENTS = ("samples", "steps", "round", "train_time", "wall_time", "virtual_time", "forward_sample_passes")


def _setting_value(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, KEEP_AS_TEXT) else value


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar fields of a record, nested dicts flattened with dots (``center_MB.parameters``); lists of numbers
    kept as lists (per-worker fields), matrices dropped."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        elif isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            out[name] = value
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):  # per rank: by field
            for field in value[0]:
                if all(isinstance(v.get(field), (int, float)) for v in value):
                    out[f"{name}.{field}"] = [v[field] for v in value]
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
    return out


def _interpolate(progress: list[dict[str, Any]], round_index: int, key: str) -> float | None:
    """``key`` at ``round_index`` from the progress records around it (linear in the round)."""
    points = [(r["round"], r[key]) for r in progress if isinstance(r.get(key), (int, float))]
    before = [p for p in points if p[0] <= round_index]
    after = [p for p in points if p[0] >= round_index]
    if not before or not after:
        return None
    (r0, v0), (r1, v1) = before[-1], after[0]
    return v0 if r1 == r0 else v0 + (v1 - v0) * (round_index - r0) / (r1 - r0)


def measurement_rows(run: Run, progress: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Round -> the scalar fields of every measurement unit's records of ``run`` at that round (first unit wins a
    name two units share; a unit's field named like a progress field is kept as ``<Unit>.<field>``), with the run's
    x-axes (samples, steps, round, times) at that round, interpolated between the progress checks around it."""
    rows: dict[int, dict[str, Any]] = {}
    folder = run.reports_dir.parent / "measurements"
    taken = {key for record in progress for key in record} | set(X_FOR_MEASUREMENTS)
    for log in sorted(folder.glob(f"*_{run.run_id}.jsonl")):
        for record in read_metrics(log):
            if "round" not in record or record.get("measure_only"):
                continue
            unit = log.name[:-len(f"_{run.run_id}.jsonl")]
            row = rows.setdefault(int(record["round"]), {})
            for key, value in _flat(record).items():
                if key in ("round", "figures"):
                    continue
                # a unit's field named like a progress field (its own wall_time, its Lanczos steps) is the unit's
                row.setdefault(f"{unit}.{key}" if key in taken else key, value)
    for round_index, row in rows.items():  # the x-axes are the run's, at the measured round
        row.update({key: _interpolate(progress, round_index, key) for key in X_FOR_MEASUREMENTS})
    return rows


def load_sweep(runs: Iterable[Run] | str | Path, entries: dict[str, dict[str, Any]] | None = None) -> Any:
    """One pandas DataFrame row per run × record (see the module docstring); runs that logged nothing give none.

    ``runs``: the runs of a sweep, or the path of a tracker (``progress_tracker.json``: every run of every sweep in
    it, with its tracker entry)."""
    import pandas as pd  # the ecosystem's table; imported only for a summary
    if isinstance(runs, (str, Path)):
        from src.Sweeps.finished import sweeps_in_tracker
        from src.Sweeps.tracker import read_tracker
        found = sweeps_in_tracker(read_tracker(runs))
        entries = {rid: e for _, found_entries, *_ in found.values() for rid, e in found_entries.items()}
        runs = list({r.run_id: r for found_runs, *_ in found.values() for r in found_runs}.values())
    rows = []
    for run in runs:
        entry = (entries or {}).get(run.run_id, {})
        settings = {k: _setting_value(v) for k, v in sorted(run.H.items())}  # one column order however read
        base = {"run_id": run.run_id, "status": entry.get("status"), "stop_reason": entry.get("detail"),
                **settings}
        progress = read_metrics(run.metrics)
        measured = measurement_rows(run, progress)
        by_round = {r["round"]: r for r in progress}
        for round_index in sorted(set(by_round) | set(measured)):
            record = {**measured.get(round_index, {}), **_flat(by_round.get(round_index, {}))}
            rows.append({**base, "round": round_index, **{k: v for k, v in record.items() if k not in base}})
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = frame.sort_values(["run_id", "round"], kind="stable").reset_index(drop=True)
    return frame


def varied_keys(frame: Any, settings: Iterable[str]) -> list[str]:
    """The settings that take more than one value across the runs (seed included), in the given order."""
    runs = frame.drop_duplicates("run_id")
    return [k for k in settings if k in runs and runs[k].astype(str).nunique() > 1]


def setting_label(row: Any, keys: list[str]) -> str:
    """``K=5, n_workers=2``: the varied keys only, seed left out (it is averaged over); paths by file name."""
    return ", ".join(f"{key}={short_value(key, row[key])}" for key in keys) or "all runs"


def curves(frame: Any, y: str, x: str, keys: list[str]) -> dict[str, Any]:
    """Setting label -> DataFrame of (x mean, y mean, y std, n seeds) per round, over the rows where y is logged and
    at the rounds every seed of the setting logged it (a seed stopped early ends its setting's curve there)."""
    data = frame[frame[y].notna() & frame[x].notna()] if y in frame and x in frame else frame.iloc[0:0]
    data = data[[v is not None and not (isinstance(v, float) and math.isnan(v)) for v in data[y]]]
    setting = [k for k in keys if k != SEED]
    out = {}
    for label, group in (data.groupby(setting, sort=False, dropna=False) if setting else [((), data)]):
        label = setting_label(group.iloc[0], setting)
        stats = group.groupby("round").agg(x=(x, "mean"), y=(y, "mean"), std=(y, "std"), n=(y, "count"))
        # only the checks every seed reached: a mean over the seeds still running (the others stopped at a target)
        # would drift for no reason but who is left
        out[label] = stats[stats["n"] == stats["n"].max()].reset_index()
    return out


def final_table(frame: Any, keys: list[str], metrics: Iterable[str]) -> Any:
    """Per setting: mean ± std over seeds of each metric's last logged value, and the number of seeds."""
    import pandas as pd
    setting = [k for k in keys if k != SEED]
    last = frame.sort_values("round").groupby("run_id").tail(1)
    rows = []
    for _, group in (last.groupby(setting, sort=False, dropna=False) if setting else [((), last)]):
        row: dict[str, Any] = {k: group.iloc[0][k] for k in setting}
        row["seeds"] = len(group)
        for metric in metrics:
            if metric in group:
                values = [v for v in group[metric] if isinstance(v, (int, float)) and math.isfinite(v)]
                row[f"{metric}_mean"] = sum(values) / len(values) if values else None
                row[f"{metric}_std"] = pd.Series(values).std() if len(values) > 1 else None
        rows.append(row)
    return pd.DataFrame(sorted(rows, key=lambda r: setting_order(r, setting)))


def setting_order(row: dict[str, Any], keys: list[str]) -> tuple:
    """A sort key for table rows: the settings' values, numbers by value, anything else by its text."""
    def value(v: Any) -> tuple:
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))
        return (0, float(v), "") if number else (1, 0.0, str(v))
    return tuple(value(row.get(k)) for k in keys)


def targets_table(frame: Any, keys: list[str]) -> Any:
    """Per setting and target: how many seeds reached it, and the mean ± std of the round, samples, steps and
    training time (and virtual time, in the asynchronous simulator) at which they did (from each run's last
    ``targets_met``)."""
    import pandas as pd
    setting = [k for k in keys if k != SEED]
    last = frame.sort_values("round").groupby("run_id").tail(1)
    rows = []
    for _, group in (last.groupby(setting, sort=False, dropna=False) if setting else [((), last)]):
        targets = json.loads(group.iloc[0]["targets"]) if isinstance(group.iloc[0].get("targets"), str) else {}
        for metric, goal in targets.items():
            reached = [m for m in (_met(row, metric) for _, row in group.iterrows()) if m is not None]
            row: dict[str, Any] = {k: group.iloc[0][k] for k in setting}
            row.update(target=f"{metric} {'>=' if metric.endswith('accuracy') else '<='} {goal}",
                       reached=f"{len(reached)}/{len(group)}")
            for at in ("round", "samples", "steps", "train_time", "virtual_time"):
                values = [m[at] for m in reached if at in m]
                if at == "virtual_time" and not values:
                    continue  # the asynchronous simulator's clock: only its runs record it
                row[f"{at}_mean"] = sum(values) / len(values) if values else None
                row[f"{at}_std"] = pd.Series(values).std() if len(values) > 1 else None
            rows.append(row)
    return pd.DataFrame(sorted(rows, key=lambda r: setting_order(r, setting)))  # stable: targets keep their order


def _met(row: Any, metric: str) -> dict[str, Any] | None:
    found = {key.split(".")[2]: row[key] for key in row.index if key.startswith(f"targets_met.{metric}.")}
    found = {k: v for k, v in found.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    return found if "round" in found else None  # a field only some runs record (virtual_time) is NaN in the rest


def spans_decades(values: Iterable[float]) -> bool:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 100


def draw_curves(frame: Any, y: str, x: str, keys: list[str], path: Path, title: str = "") -> list[Path]:
    """``y`` against ``x``, one curve per setting with a mean ± std band over seeds; legend outside the data,
    short labels, a log y axis when the values span two decades or more."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.5), layout="constrained")
    drawn = curves(frame, y, x, keys)
    for n, (label, stats) in enumerate(drawn.items()):
        color = f"C{n % 10}"
        seeds = int(stats["n"].max()) if len(stats) else 0
        ax.plot(stats["x"], stats["y"], "o-", ms=3, color=color, label=f"{label} (n={seeds})")
        if seeds > 1:
            std = stats["std"].fillna(0)
            ax.fill_between(stats["x"], stats["y"] - std, stats["y"] + std, color=color, alpha=0.2, lw=0)
    if spans_decades(v for s in drawn.values() for v in s["y"]):
        ax.set_yscale("log")
    ax.set_xlabel(X_AXES.get(x, x))
    ax.set_ylabel(y)
    ax.grid(alpha=0.3, which="both")
    readable_ticks(ax)
    if drawn and max(map(len, drawn)) > 40:  # long labels beside the axes would squeeze them: below
        fig.legend(fontsize="small", loc="outside lower center")
    elif drawn:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.set_title(title or f"{y} against {X_AXES.get(x, x)}: mean ± std over seeds", fontsize="medium")
    return save_figure(fig, path)


def resource_rows(frame: Any, keys: list[str]) -> Any:
    """Per run (last record): workers, memory per worker (MB: the memory unit's per-rank figures, or its total
    over the workers), bytes and messages per worker, link and communication time."""
    import pandas as pd
    last = frame.sort_values("round").groupby("run_id").tail(1)
    rows = []
    for _, run in last.iterrows():
        per_worker = run.get("worker_bytes") if isinstance(run.get("worker_bytes"), list) else []
        workers = max(len(per_worker), 1)
        rows.append({**{k: run[k] for k in keys if k != SEED}, "run_id": run["run_id"], "workers": workers,
                     "memory_per_worker_MB": _memory_per_worker(frame[frame["run_id"] == run["run_id"]], workers),
                     "bytes_per_worker": sum(per_worker) / workers if per_worker else run.get("bytes_sent"),
                     "messages_per_worker": sum(run.get("worker_messages") or []) / workers,
                     "link_time": run.get("link_time"), "communication_time": run.get("communication_time"),
                     "train_time": run.get("train_time")})
    return pd.DataFrame(rows)


def _memory_per_worker(rows: Any, workers: int) -> float | None:
    """MB per worker at the run's last memory measurement: the mean over ranks of a multi-process run's per-rank
    figures (centre, copies, scratch), else the memory unit's total over the workers."""
    if "total_MB" not in rows or not rows["total_MB"].notna().any():
        return None
    last = rows[rows["total_MB"].notna()].iloc[-1]
    parts = [last.get(f"per_rank.{k}") for k in ("center_MB", "copies_MB", "scratch_MB")]
    if all(isinstance(p, list) for p in parts):
        return sum(map(sum, parts)) / len(parts[0])
    return last["total_MB"] / workers


def draw_resources(frame: Any, keys: list[str], path: Path, title: str = "") -> list[Path]:
    """Memory per worker, bytes per worker, the modelled link time (``--link_latency``/``--link_bandwidth``) and the
    measured communication time against the number of workers, one line per setting of the other varied keys (mean
    over seeds)."""
    table = resource_rows(frame, keys)
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), layout="constrained")
    others = [k for k in keys if k not in (SEED, "n_workers")]
    panels = (("memory_per_worker_MB", "memory per worker (MB)"), ("bytes_per_worker", "bytes sent per worker"),
              ("link_time", "modelled link time (s)"), ("communication_time", "measured communication time (s)"))
    groups = table.groupby(others, sort=False, dropna=False) if others else [((), table)]
    for n, (_, group) in enumerate(groups):
        label = setting_label(group.iloc[0], others)
        means = group.groupby("workers").mean(numeric_only=True).reset_index()
        for ax, (column, _) in zip(axes, panels):
            if column in means and means[column].notna().any():  # a column of None only is dropped by mean
                # settings often coincide (memory does not depend on the link): shrinking markers keep each visible
                ax.plot(means["workers"], means[column], "-", marker="osD^v"[n % 5], ms=max(9 - 1.5 * n, 3),
                        lw=max(2.5 - 0.4 * n, 1), color=f"C{n % 10}", label=label)
    for ax, (column, ylabel) in zip(axes, panels):
        ax.set(xlabel="workers", ylabel=ylabel)
        ax.grid(alpha=0.3)
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # workers are whole
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {ylabel} logged", ha="center", va="center", transform=ax.transAxes)
    if axes[-1].lines:
        axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    if title:
        fig.suptitle(title, fontsize="medium")
    return save_figure(fig, path)


def markdown(table: Any) -> str:
    """A DataFrame as a Markdown table (numbers to 4 significant digits, missing as '-')."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    header = [str(c) for c in table.columns]
    rows = [[cell(v) for v in row] for row in table.itertuples(index=False)]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [header] + rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def report_status(run: Run) -> str | None:
    try:
        return read_report(run.report)["status_detail"]
    except (OSError, ValueError, KeyError):
        return None
