"""Run a sweep of dol1.py experiments: a grid of settings, one dol1.py process per run, resumable.

    python master.py --grid '{"step_size": [1e-3, 1e-2], "K": [1, 5]}' --fixed '{"rounds": 500}'
    python master.py --sweep sweep.json              # {"grid": {...}, "fixed": {...}}
    python master.py --sweep sweep.json --dry_run    # list the runs and the device plan, start nothing

Runs are the Cartesian product of the grid, with the fixed settings applied to all; every run is checked with
dol1.py's own parser before anything starts. Each run is ``dol1.py --key=value ...`` in its own process and its own
session (so it outlives a killed master); its run id is the id of its report. Per run, under
``<output_root or project>/reports/``: ``<run id>.txt`` (report), ``.metrics.jsonl`` and ``.log`` (stdout and stderr of
every attempt, appended). Placement: ``--runs_per_gpu`` runs per visible GPU, each child seeing only its GPU
(CUDA_VISIBLE_DEVICES); without GPUs (or with ``--cpu``) ``--cpu_slots`` runs at a time on the CPU, default
max(1, cores // 2). Every child's threads are capped at max(1, cores // slots) (OMP_NUM_THREADS, MKL_NUM_THREADS).

State: ``progress_tracker.json`` (``--tracker``), keyed by run id, rewritten atomically; ``<tracker>.lock`` keeps a
second master off it. Starting the same sweep again resumes it: done runs are skipped, live runs adopted, runs that
ended while no master watched are judged from their report, failed runs retried until ``--max_attempts`` failures,
interrupted runs run again (an attempt, but not a failure). Ctrl-C / SIGTERM stops every run (SIGTERM, then SIGKILL
after ``--grace`` seconds; a second Ctrl-C kills at once) and marks them interrupted.

At the end: a table of the runs (printed, and written as ``figures/sweep_summary_<sweep id>.md``) and a figure
``figures/sweep_<sweep id>.{pdf,png}``: for a step_size × K grid the best step size per K (lowest final training
loss; a diverged run is never the best) and its loss against rounds, otherwise the loss of every run against rounds.

Exit status: 0 every run done, 1 some run failed, 2 bad input (nothing started, tracker untouched), 3 another master
holds the tracker, 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

PROJECT_ROOT = Path(__file__).resolve().parent
TABLE_METRICS = ("loss", "test_loss", "test_accuracy")


def build_parser() -> argparse.ArgumentParser:
    """The command line of master.py."""
    from src.launchers import cpu_cores

    parser = argparse.ArgumentParser(prog="master.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--grid", help="JSON object: dol1.py key -> list of values")
    parser.add_argument("--fixed", help="JSON object: dol1.py key -> value for every run")
    parser.add_argument("--sweep", help='JSON file {"grid": {...}, "fixed": {...}} (--grid/--fixed override it)')
    parser.add_argument("--tracker", default=str(PROJECT_ROOT / "progress_tracker.json"), help="progress tracker")
    parser.add_argument("--runs_per_gpu", type=int, default=1, help="runs packed on each GPU")
    parser.add_argument("--cpu_slots", type=int, default=max(1, cpu_cores() // 2),
                        help="parallel runs without GPUs (default: half the cores)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when GPUs are visible")
    parser.add_argument("--max_attempts", type=int, default=2, help="failed attempts before a run is given up")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL on stop")
    parser.add_argument("--poll_interval", type=float, default=0.5, help="seconds between checks of the runs")
    parser.add_argument("--dry_run", action="store_true", help="print the runs and the device plan, start nothing")
    return parser


def _resolve(argv: list[str]) -> dict[str, Any]:
    """dol1.py's resolve_config, with argparse's usage screen reduced to its error line."""
    import dol1
    from src.utils import ConfigError

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return dol1.resolve_config(argv)
    except SystemExit as err:
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        raise ConfigError(lines[-1] if lines else f"dol1.py refused {argv}") from err


class Display:
    """Sweep progress: a tqdm bar over all rounds (with time left) on a terminal, one plain line per event otherwise."""

    def __init__(self, runs: list, scheduler: Any):
        self.runs, self.scheduler, self.bar = runs, scheduler, None
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=sum(r.H["rounds"] for r in runs), unit="round", desc="sweep", dynamic_ncols=True)

    def say(self, text: str) -> None:
        from src.sweep import now
        line = f"[{now()[11:]}] {text}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def __call__(self, kind: str, run: Any, entry: dict[str, Any] | None) -> None:
        if kind == "tick":
            self._update_bar()
            return
        settings = ", ".join(f"{k}={v}" for k, v in run.grid_values.items())
        text = {"skip": "done already", "adopt": f"still running (pid {entry['pid']}): adopted",
                "launch": f"started on {entry['device']}, attempt {entry['attempts']}, pid {entry['pid']}",
                "done": f"done after {entry['rounds_done']} rounds",
                "failed": f"FAILED (exit code {entry['exit_code']}, failure {entry['failures']}"
                          f"/{self.scheduler.max_attempts}): {entry['detail'] or 'see ' + entry['log']}",
                "interrupted": "interrupted", "retry": "queued again"}[kind]
        self.say(f"{run.run_id} ({settings}): {text}")

    def _update_bar(self) -> None:
        if self.bar is None:
            return
        entries = [self.scheduler.entry(r) for r in self.runs]
        finished = sum(e["status"] in ("done", "failed") for e in entries)
        progress = sum(e["rounds_total"] if e["status"] in ("done", "failed") else e["rounds_done"] for e in entries)
        self.bar.update(max(0, progress - self.bar.n))
        self.bar.set_postfix_str(f"runs {finished}/{len(entries)}, "
                                 f"{sum(e['status'] == 'running' for e in entries)} running")

    def close(self) -> None:
        if self.bar is not None:
            self._update_bar()
            self.bar.close()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)


def summary_table(runs: list, entries: dict[str, dict[str, Any]], grid: dict[str, list]) -> str:
    """A Markdown table: run id, the grid values, status, attempts, rounds and the final metrics of each run."""
    from src.sweep import read_metrics

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


def figure_curves(runs: list, grid: dict[str, list]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The curves of the sweep figure as (legend label, metrics records), in the order they are drawn.

    For a step_size × K grid: per K, the run with the lowest final training loss (non-finite losses lose); else
    every run that recorded a loss.
    """
    from src.sweep import read_metrics

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


def sweep_figure(runs: list, grid: dict[str, list], path: Path, title: str) -> list[Path]:
    """Loss against rounds (see :func:`figure_curves` for which runs), written as .pdf and .png."""
    shown = figure_curves(runs, grid)
    import matplotlib
    matplotlib.use("Agg")  # no display; set here, never at import
    import matplotlib.pyplot as plt

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


def _dry_run(runs: list, slots: list, tracker: Path, sweep_id: str) -> None:
    from src.sweep import read_tracker

    known = read_tracker(tracker)["runs"]
    print(f"sweep {sweep_id}: {_count(len(runs), 'run')}; tracker {tracker}")
    devices = sorted({slot.device for slot in slots})
    print(f"device plan: {_count(len(slots), 'slot')} on {', '.join(devices)}; each child: "
          + " ".join(f"{k}={v!r}" for k, v in slots[0].env))
    for run in runs:
        status = known.get(run.run_id, {}).get("status", "new")
        print(f"  {run.run_id}  [{status}]  {' '.join(run.argv)}")
    print("dry run: nothing started")


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) a sweep; exits with the status described in the module docstring."""
    if str(PROJECT_ROOT) not in sys.path:  # `import dol1` and `src` from any working directory
        sys.path.insert(0, str(PROJECT_ROOT))
    import dol1
    from src import launchers
    from src import sweep as sw

    args = build_parser().parse_args(argv)
    limits = {"runs_per_gpu": 1, "cpu_slots": 1, "max_attempts": 1, "grace": 0, "poll_interval": 0.01}
    for name, low in limits.items():
        if getattr(args, name) < low:
            print(f"master.py: error: --{name} must be >= {low}, got {getattr(args, name)}", file=sys.stderr)
            raise SystemExit(2)
    tracker = Path(args.tracker).resolve()
    try:
        grid, fixed = sw.load_spec(args.grid, args.fixed, args.sweep)
        if not grid and not fixed:
            raise sw.SweepError("nothing to sweep: give --grid and/or --fixed, or --sweep FILE")
        runs = sw.expand(grid, fixed, _resolve, list(dol1.DEFAULTS), PROJECT_ROOT)
        sw.read_tracker(tracker)  # a broken tracker is bad input too, found before anything starts
    except sw.SweepError as err:
        print(f"master.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    sweep_id = sw.sweep_hash(grid, fixed)
    gpus = [] if args.cpu else launchers.visible_gpus()
    slots = launchers.plan_slots(gpus, args.runs_per_gpu, args.cpu_slots, launchers.cpu_cores())
    if args.dry_run:
        _dry_run(runs, slots, tracker, sweep_id)
        return 0

    tracker.parent.mkdir(parents=True, exist_ok=True)
    try:
        with sw.tracker_lock(tracker):
            scheduler = sw.Scheduler(runs, slots, tracker, {"id": sweep_id, "grid": grid, "fixed": fixed},
                                     dol1=PROJECT_ROOT / "dol1.py", python=sys.executable,
                                     max_attempts=args.max_attempts, grace=args.grace,
                                     poll_interval=args.poll_interval)
            display = Display(runs, scheduler)
            scheduler.on_event = display
            display.say(f"sweep {sweep_id}: {_count(len(runs), 'run')} on {_count(len(slots), 'slot')} "
                        f"({', '.join(sorted({s.device for s in slots}))}); tracker {tracker}")
            previous = {}
            with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
                for sig in (signal.SIGINT, signal.SIGTERM):
                    previous[sig] = signal.signal(sig, lambda signum, frame: scheduler.request_stop())
            try:
                statuses = scheduler.run()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                display.close()
    except sw.TrackerLocked as err:
        print(f"master.py: error: {err}", file=sys.stderr)
        raise SystemExit(3) from None

    root = runs[0].reports_dir.parent if len({r.reports_dir for r in runs}) == 1 else PROJECT_ROOT
    table = summary_table(runs, scheduler.data["runs"], grid)
    print(table, end="")
    summary = root / "figures" / f"sweep_summary_{sweep_id}.md"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(f"# Sweep {sweep_id}\n\ngrid: `{json.dumps(grid)}`  \nfixed: `{json.dumps(fixed)}`\n\n"
                       + table)
    figure = sweep_figure(runs, grid, root / "figures" / f"sweep_{sweep_id}", f"sweep {sweep_id}")
    print(f"summary: {summary}\nfigure: {', '.join(map(str, figure))}")
    if scheduler.stop_requests:
        print("master.py: interrupted; start the same sweep again to resume", file=sys.stderr)
        raise SystemExit(130)
    failed = [rid for rid, status in statuses.items() if status != "done"]
    if failed:
        print(f"master.py: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    main()
