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

``--gpus_per_run N`` gives each run N GPUs (a multi-process run starts one worker per GPU, NCCL).

Launchers (``--launcher``): ``local`` (the default) as above; ``slurm`` submits each run as one SLURM job through
submitit (job name = run id; ``--slurm_partition``, ``--slurm_time_min``, ``--gpus_per_run``, ``--cpus_per_run``,
``--slurm_array_parallelism`` jobs in flight, ``--slurm_extra`` JSON; a multi-GPU block-parallel run is one job with
torchrun inside; a preempted or timed-out job is requeued and resumes from its checkpoint); ``submitit_local`` runs
the same submitit code path with local processes, to rehearse a cluster sweep. submitit's files go to
``<tracker folder>/submitit/<run id>/``. Each attempt is identified by a token in its environment, which dol1.py
writes into its status file and report, so the outcome is judged the same way on every launcher.

State: ``progress_tracker.json`` (``--tracker``), keyed by run id, rewritten atomically; ``<tracker>.lock`` keeps a
second master off it. Starting the same sweep again resumes it: done runs are skipped, live runs adopted, runs that
ended while no master watched are judged from their report, failed runs retried until ``--max_attempts`` failures,
interrupted runs run again (an attempt, but not a failure). Ctrl-C / SIGTERM stops every run (SIGTERM, then SIGKILL
after ``--grace`` seconds; a second Ctrl-C kills at once) and marks them interrupted.

At the end (``src/Sweeps/summary.py``): a table of the runs (printed, and written as
``figures/sweep_summary_<sweep id>.md``), a CSV of every run's final record (all counters and metrics,
``figures/sweep_summary_<sweep id>.csv``), mean ± std over seeds when ``seed`` is a grid key (in the table and
``figures/sweep_seeds_<sweep id>.csv``) and a figure ``figures/sweep_<sweep id>.{pdf,png}`` of the training loss
against ``--plot_x`` (default: training samples): for a grid of step sizes, the best step size per setting of the
other keys at an equal budget (the smallest that every run with a finite loss reached on that axis), with a warning
when the best is at the edge of the grid; otherwise every setting. ``--summarize TRACKER`` rebuilds all of this for
the finished sweep(s) of a tracker without running anything.

Exit status: 0 every run done, 1 some run failed, 2 bad input (nothing started, tracker untouched), 3 another master
holds the tracker, 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

PROJECT_ROOT = Path(__file__).resolve().parent
if str(PROJECT_ROOT) not in sys.path:  # `import dol1` and `src` from any working directory
    sys.path.insert(0, str(PROJECT_ROOT))

from src.cli import ConfigError, OneLineParser  # noqa: E402 - after the path fix above (imports no torch)
from src.Optimizer_Engines.parallel.worker_pool import available_cpus  # noqa: E402 - imports no torch either
from src.plots import X_AXES  # noqa: E402 - imports no torch (nor matplotlib) either

_LIMITS = {"runs_per_gpu": (1, 1024), "cpu_slots": (1, 4096), "max_attempts": (1, 1000), "grace": (0, 86400),
           "poll_interval": (0.01, 3600), "gpus_per_run": (1, 1024), "cpus_per_run": (0, 4096),
           "slurm_time_min": (1, 525600), "slurm_array_parallelism": (1, 100000)}  # flag: (lowest, highest)
LAUNCHERS = ("local", "slurm", "submitit_local")
_CLUSTER_DEFAULTS = {"slurm_partition": "", "slurm_time_min": 60, "slurm_array_parallelism": 16,
                     "slurm_extra": ""}  # flags that only a submitit launcher uses


def build_parser() -> argparse.ArgumentParser:
    """The command line of master.py."""
    parser = OneLineParser(prog="master.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--grid", help="JSON object: dol1.py key -> list of values")
    parser.add_argument("--fixed", help="JSON object: dol1.py key -> value for every run")
    parser.add_argument("--sweep", help='JSON file {"grid": {...}, "fixed": {...}, "zip": [...], "summary": {...}} '
                                        '(--grid/--fixed/--zip override it; its relative paths are the file\'s)')
    parser.add_argument("--zip", help='JSON list of settings blocks that vary together, crossed with the grid: '
                                      '[{"model": "mlp", "config": [64]}, {"model": "cnn", "config": [16]}]')
    parser.add_argument("--tracker", default=str(PROJECT_ROOT / "progress_tracker.json"), help="progress tracker")
    parser.add_argument("--runs_per_gpu", type=int, default=1, help="runs packed on each GPU")
    parser.add_argument("--cpu_slots", type=int, default=max(1, available_cpus() // 2),
                        help="parallel runs without GPUs (default: half the cores)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when GPUs are visible")
    parser.add_argument("--max_attempts", type=int, default=2, help="failed attempts before a run is given up")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL on stop")
    parser.add_argument("--poll_interval", type=float, default=0.5, help="seconds between checks of the runs")
    parser.add_argument("--dry_run", action="store_true", help="print the runs and the device plan, start nothing")
    parser.add_argument("--plot_x", default=None, choices=list(X_AXES),
                        help="x-axis of the training-loss figure and of the equal budget for the best step size "
                        "(default: the first of --x, else samples)")
    parser.add_argument("--x", choices=list(X_AXES), help="x-axis of the summary's curves (default: the sweep "
                        "file's summary.x, else --plot_x)")
    parser.add_argument("--y", help="the quantity the summary draws and tabulates: any progress or measurement field "
                        "(test_accuracy, coupling_max, total_MB, staleness_max, bytes_sent, …; default: the sweep "
                        "file's summary.y, else loss)")
    parser.add_argument("--summarize", metavar="TRACKER",
                        help="rebuild the table, CSVs and figure of the sweep(s) in TRACKER; runs nothing")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: processes here; slurm: one SLURM job per run (submitit); submitit_local: the "
                             "same submitit path with local processes, to rehearse a cluster sweep")
    parser.add_argument("--gpus_per_run", type=int, default=1,
                        help="GPUs per run; a multi-process run (--training_mode blockwise) starts one worker per "
                             "GPU (NCCL); on SLURM the job's GPUs, with torchrun inside")
    parser.add_argument("--cpus_per_run", type=int, default=0,
                        help="thread cap per run (0: cores // slots here; on SLURM the job's CPUs, 0 = the "
                             "cluster's default)")
    parser.add_argument("--slurm_partition", default=_CLUSTER_DEFAULTS["slurm_partition"],
                        help="SLURM partition ('' = the cluster's default)")
    parser.add_argument("--slurm_time_min", type=int, default=_CLUSTER_DEFAULTS["slurm_time_min"],
                        help="a job's time limit in minutes (reaching it: checkpoint, requeue, resume)")
    parser.add_argument("--slurm_array_parallelism", type=int, default=_CLUSTER_DEFAULTS["slurm_array_parallelism"],
                        help="jobs in flight (queued or running) at a time")
    parser.add_argument("--slurm_extra", default=_CLUSTER_DEFAULTS["slurm_extra"],
                        help='JSON object of more submitit SlurmExecutor options, e.g. \'{"account": "proj", '
                             '"qos": "high", "mem": "32G"}\'')
    return parser


def check_limits(args: argparse.Namespace) -> None:
    """Ranges of the numeric flags (exit 2 naming the flag)."""
    for name, (low, high) in _LIMITS.items():
        value = getattr(args, name)
        if not math.isfinite(value) or not low <= value <= high:
            print(f"master.py: error: --{name} must be a number in [{low}, {high}], got {value}", file=sys.stderr)
            raise SystemExit(2)
    if args.launcher == "local":
        given = [f"--{k}" for k, default in _CLUSTER_DEFAULTS.items() if getattr(args, k) != default]
        if given:
            print(f"master.py: error: {', '.join(given)}: only for --launcher slurm or submitit_local (got "
                  f"--launcher local)", file=sys.stderr)
            raise SystemExit(2)


if __name__ == "__main__":  # --help, a misspelled flag or a bad range answer before torch is imported
    check_limits(build_parser().parse_args(sys.argv[1:]))

# everything below imports torch
import dol1  # noqa: E402
from src import Sweeps as sw  # noqa: E402

# the end-of-sweep helpers, under the names tests and users imported from master.py
figure_curves, summary_table, sweep_figure = sw.figure_curves, sw.summary_table, sw.sweep_figure


def _resolve(argv: list[str]) -> dict[str, Any]:
    """dol1.py's resolve_config, with argparse's usage screen reduced to its error line."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            H = dol1.resolve_config(argv)
            dol1.parse_units(*dol1.units_text(H))  # an unknown plugin or argument is bad input of the sweep too
            return H
    except SystemExit as err:
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        raise ConfigError(lines[-1] if lines else f"dol1.py refused {argv}") from err


class Display:
    """Sweep progress: a tqdm bar over all rounds (with time left) on a terminal, one plain line per event otherwise."""

    def __init__(self, runs: list, scheduler: Any):
        self.runs, self.scheduler, self.bar = runs, scheduler, None
        if sys.stdout.isatty():
            from tqdm import tqdm  # only on a terminal
            self.bar = tqdm(total=sum(r.H["rounds"] for r in runs), unit="round", desc="sweep", dynamic_ncols=True)

    def say(self, text: str) -> None:
        line = f"[{sw.now()[11:]}] {text}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def __call__(self, kind: str, run: Any, entry: dict[str, Any] | None) -> None:
        if kind == "tick":
            self._update_bar()
            return
        settings = ", ".join(f"{k}={v}" for k, v in run.grid_values.items())
        where = f"job {entry['job_id']}" if entry.get("job_id") else f"pid {entry['pid']}"
        text = {"skip": f"{entry['status']} already", "diverged": "diverged (a result: not retried)",
                "adopt": f"still running ({where}): adopted",
                "launch": f"started on {entry['device']}, attempt {entry['attempts']}, {where}",
                "done": f"done after {entry['rounds_done']} rounds",
                "failed": f"FAILED (exit code {entry['exit_code']}, failure {entry['failures']}"
                          f"/{self.scheduler.max_attempts}): {entry['detail'] or 'see ' + entry['log']}",
                "interrupted": "interrupted", "retry": "queued again"}[kind]
        self.say(f"{run.run_id} ({settings}): {text}")

    def _update_bar(self) -> None:
        if self.bar is None:
            return
        entries = [self.scheduler.entry(r) for r in self.runs]
        finished = sum(e["status"] in ("done", "diverged", "failed") for e in entries)
        progress = sum(e["rounds_total"] if e["status"] in ("done", "diverged", "failed") else e["rounds_done"]
                       for e in entries)
        self.bar.update(max(0, progress - self.bar.n))
        self.bar.set_postfix_str(f"runs {finished}/{len(entries)}, "
                                 f"{sum(e['status'] == 'running' for e in entries)} running")

    def close(self) -> None:
        if self.bar is not None:
            self._update_bar()
            self.bar.close()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cluster_module() -> Any:
    """src.Sweeps.slurm (the submitit launchers), or bad input saying what to install."""
    try:
        from src.Sweeps import slurm  # only the submitit launchers need submitit
    except ImportError as err:
        raise ConfigError(f"--launcher slurm/submitit_local needs submitit ({err}): pip install submitit==1.5.4") \
            from err
    return slurm


def _job_options(args: argparse.Namespace, runs: list[sw.Run]) -> Any:
    """The submitit launchers' job options, checked (sbatch rendered for the first run): ConfigError if bad."""
    slurm = _cluster_module()
    options = slurm.JobOptions(partition=args.slurm_partition, time_min=args.slurm_time_min,
                               gpus_per_run=0 if args.cpu else args.gpus_per_run, cpus_per_run=args.cpus_per_run,
                               array_parallelism=args.slurm_array_parallelism,
                               extra=slurm.parse_extra(args.slurm_extra))
    if not args.dry_run:  # a dry run may show the sbatch script where there is no SLURM
        slurm.check_cluster(args.launcher)
    slurm.sbatch_script(options, _submitit_root(args) / runs[0].run_id, runs[0].run_id, PROJECT_ROOT)
    return options


def _submitit_root(args: argparse.Namespace) -> Path:
    return Path(args.tracker).resolve().parent / "submitit"


def make_launcher(args: argparse.Namespace) -> Any:
    """The launcher of ``--launcher`` (after :func:`plan` checked its options)."""
    if args.launcher == "local":
        return sw.LocalLauncher()
    return _cluster_module().SubmititLauncher(args.launcher, _submitit_root(args), args.job_options, PROJECT_ROOT)


def torchrun_procs(args: argparse.Namespace) -> Any:
    """Processes per run under torchrun: on SLURM, ``--gpus_per_run`` for an engine with a torchrun worker
    (blockwise, async, entire as data-parallel), else 1."""
    if args.launcher != "slurm" or args.cpu or args.gpus_per_run < 2:
        return lambda run: 1
    return lambda run: args.gpus_per_run if dol1.resolve_engine(run.H["training_mode"]).torchrun_worker else 1


def _dry_run(runs: list, slots: list, tracker: Path, sweep_id: str) -> None:
    known = sw.read_tracker(tracker)["runs"]
    print(f"sweep {sweep_id}: {_count(len(runs), 'run')}; tracker {tracker}")
    devices = sorted({slot.device for slot in slots})
    print(f"device plan: {_count(len(slots), 'slot')} on {', '.join(devices)}; each child: "
          + (" ".join(f"{k}={v!r}" for k, v in slots[0].env) or "the job's resources"))
    for run in runs:
        status = known.get(run.run_id, {}).get("status", "new")
        print(f"  {run.run_id}  [{status}]  {' '.join(run.argv)}")
    print("dry run: nothing started")


def _fail(message: str, status: int) -> None:
    print(f"master.py: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def plan(args: argparse.Namespace) -> tuple[list[sw.Run], sw.Spec, str, list[sw.Slot]]:
    """Check the command line and expand the sweep; exits 2 on bad input, before anything starts."""
    check_limits(args)
    try:
        spec = sw.load_spec(args.grid, args.fixed, args.sweep, args.zip)
        if not spec.grid and not spec.fixed and not spec.linked:
            raise sw.SweepError("nothing to sweep: give --grid and/or --fixed, or --sweep FILE")
        xs = spec.summary.get("x", [])
        if any(x not in X_AXES for x in (xs if isinstance(xs, list) else [xs])):
            raise sw.SweepError(f"the sweep file's summary.x {xs!r} is not valid; valid: {sorted(X_AXES)}")
        runs = sw.expand(spec, None, _resolve, list(dol1.DEFAULTS), PROJECT_ROOT, dol1.run_identity,
                         always={"resume": "auto"})
        sw.read_tracker(Path(args.tracker))  # a broken tracker is bad input too, found before anything starts
        args.job_options = None if args.launcher == "local" else _job_options(args, runs)
        if args.launcher == "slurm":  # a slot is a job in flight; its GPUs and CPUs are the job's
            slots = sw.job_slots("slurm", args.slurm_array_parallelism, args.cpus_per_run)
        else:
            slots = sw.plan_slots([] if args.cpu else sw.visible_gpus(), args.runs_per_gpu, args.cpu_slots,
                                  available_cpus(), args.gpus_per_run, args.cpus_per_run)
    except (ConfigError, ValueError) as err:  # SweepError is a ConfigError
        _fail(str(err), 2)
    return runs, spec, sw.sweep_hash(spec.grid, spec.fixed, spec.linked), slots


def execute(args: argparse.Namespace, runs: list[sw.Run], spec: sw.Spec, sweep_id: str,
            slots: list[sw.Slot]) -> sw.Scheduler:
    """Run the sweep under the tracker's lock, with Ctrl-C / SIGTERM turned into a graceful stop."""
    tracker = Path(args.tracker).resolve()
    tracker.parent.mkdir(parents=True, exist_ok=True)
    try:
        with sw.tracker_lock(tracker):
            scheduler = sw.Scheduler(runs, slots, tracker, {"id": sweep_id, "grid": spec.grid, "fixed": spec.fixed,
                                                            **({"zip": spec.linked} if spec.linked else {}),
                                                            **({"summary": spec.summary} if spec.summary else {})},
                                     dol1=PROJECT_ROOT / "dol1.py", python=sys.executable,
                                     max_attempts=args.max_attempts, grace=args.grace,
                                     poll_interval=args.poll_interval, launcher=make_launcher(args),
                                     torchrun_procs=torchrun_procs(args))
            display = Display(runs, scheduler)
            scheduler.on_event = display
            display.say(f"sweep {sweep_id}: {_count(len(runs), 'run')} on {_count(len(slots), 'slot')} "
                        f"({', '.join(sorted({s.device for s in slots}))}); tracker {tracker}")
            previous = {}
            with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
                for sig in (signal.SIGINT, signal.SIGTERM):
                    previous[sig] = signal.signal(sig, lambda signum, frame: scheduler.request_stop())
            try:
                scheduler.run()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                display.close()
    except sw.TrackerLocked as err:
        _fail(str(err), 3)
    return scheduler


def show_summary(runs: list[sw.Run], entries: dict[str, Any], grid: dict[str, list], fixed: dict[str, Any],
                 sweep_id: str, x: str | list[str], y: str = "loss", plot_x: str | None = None) -> None:
    """Write the end-of-sweep files and print the table, the warnings and the file names (``x``: the curves' axis or
    axes; ``plot_x``: the training-loss figure's, default the first of ``x``)."""
    root = runs[0].reports_dir.parent if len({r.reports_dir for r in runs}) == 1 else PROJECT_ROOT
    xs = (x if isinstance(x, list) else [x]) if x else ["samples"]
    summary = sw.write_summary(runs, entries, grid, fixed, sweep_id, root, plot_x or xs[0], y, xs)
    print(summary.text, end="")
    print(f"summary: {summary.markdown}\ncsv: {summary.csv}"
          + (f"\nseeds csv: {summary.seeds_csv}" if summary.seeds_csv else "")
          + f"\nfigure: {', '.join(map(str, summary.figures))}")


def summarize(args: argparse.Namespace) -> None:
    """``--summarize TRACKER``: the summary of every sweep the tracker holds, from its runs' files; exits 2 on a
    missing or invalid tracker or when other sweep flags are given too."""
    given = [f"--{k}" for k in ("grid", "fixed", "sweep", "zip") if getattr(args, k)] + \
        (["--dry_run"] if args.dry_run else [])
    if given:
        _fail(f"--summarize rebuilds a finished sweep from its tracker alone; drop {', '.join(given)}", 2)
    tracker = Path(args.summarize)
    if not tracker.is_file():
        _fail(f"--summarize {str(tracker)!r}: no such tracker file (master.py writes progress_tracker.json, or the "
              f"file given to --tracker)", 2)
    try:
        data = sw.read_tracker(tracker)
        sweeps = sw.sweeps_in_tracker(data)
        if args.y is not None:
            sw.check_y(args.y, [run for runs, *_ in sweeps.values() for run in runs])
    except sw.SweepError as err:
        _fail(f"--summarize: {err}", 2)
    for sweep_id, (runs, entries, grid, fixed) in sweeps.items():
        spec_summary = data["sweeps"][sweep_id].get("summary") or {}  # the sweep file's y and x, unless given
        show_summary(runs, entries, grid, fixed, sweep_id, args.x or spec_summary.get("x") or args.plot_x,
                     args.y or spec_summary.get("y") or "loss", args.plot_x)
    if len(sweeps) > 1:  # several specs of one tracker: also one table of all their runs
        runs = list({r.run_id: r for runs, *_ in sweeps.values() for r in runs}.values())
        entries = {k: v for _, e, *_ in sweeps.values() for k, v in e.items()}
        grid: dict[str, list] = {}
        for *_, sweep_grid, _ in sweeps.values():  # the union of every sweep's values of every varied key
            for key, values in sweep_grid.items():
                grid.setdefault(key, []).extend(v for v in values if v not in grid.get(key, []))
        fixed = {k: v for *_, f in sweeps.values() for k, v in f.items() if k not in grid}
        show_summary(runs, entries, grid, fixed, "S" + sw.sweep_hash(grid, {"sweeps": sorted(sweeps)})[1:] + "_all",
                     args.x or args.plot_x, args.y or "loss")


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) a sweep: plan → execute → summarise; exits with the status in the module docstring."""
    args = build_parser().parse_args(argv)
    if args.summarize is not None:
        summarize(args)
        return 0
    runs, spec, sweep_id, slots = plan(args)
    if args.dry_run:
        _dry_run(runs, slots, Path(args.tracker).resolve(), sweep_id)
        if args.launcher == "slurm":
            print(f"sbatch script of {runs[0].run_id}:\n" + _cluster_module().sbatch_script(
                args.job_options, _submitit_root(args) / runs[0].run_id, runs[0].run_id, PROJECT_ROOT,
                python=sys.executable))
        return 0
    scheduler = execute(args, runs, spec, sweep_id, slots)
    show_summary(runs, scheduler.data["runs"], spec.varied, spec.fixed, sweep_id,
                 args.x or spec.summary.get("x") or args.plot_x, args.y or spec.summary.get("y") or "loss",
                 args.plot_x)
    if scheduler.stop_requests:
        print("master.py: interrupted; start the same sweep again to resume", file=sys.stderr)
        raise SystemExit(130)
    failed = [run.run_id for run in runs if scheduler.entry(run)["status"] not in sw.ENDED]
    if failed:
        print(f"master.py: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    main()
