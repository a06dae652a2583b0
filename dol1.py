"""Run one experiment: every key of DEFAULTS is a command-line flag (``python dol1.py --help``).

    python dol1.py                                   # the default: block-wise training on the bundled digits
    python dol1.py --training_mode entire --rounds 500
    python dol1.py --training_mode blockwise --model cnn_ensemble --config "[[16,16],[32,32],[32,64]]" --rounds 50

Writes ``reports/R<hash>.txt`` (header + progress lines), ``reports/R<hash>.metrics.jsonl`` (one JSON record per
progress check), ``figures/training_curve_R<hash>.{pdf,png}`` and whatever the units in ``measurements/Units.txt``
write; checkpoints under ``checkpoints/R<hash>/`` and the model as ``reports/R<hash>.model.pt``. Exit status: 0 finished
or stopped by a stopper, 1 failed, 2 bad input (nothing written), 3 the same run is already running, 130 interrupted.
"""
from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

PROJECT_ROOT = Path(__file__).resolve().parent
if str(PROJECT_ROOT) not in sys.path:  # so that `python /elsewhere/dol1.py` finds `src`
    sys.path.insert(0, str(PROJECT_ROOT))

from src.cli import ConfigError, key_comments, parse_arguments, settings_argv  # noqa: E402 - after the path fix above
from src.Optimizer_Engines import ENGINES  # noqa: E402 - names every engine, imports none (nor torch)

DEFAULTS: dict[str, Any] = {
    # --- what to train ---
    "training_mode": "blockwise_sequential",  # an engine of the table (see below) or a dotted path package.module.function
    "model": "residual_cnn",  # linear_nn | mlp | cnn | residual_cnn | cnn_ensemble | feedforward_ensemble | ResNet18 | ResNet34
    "config": [16, 32, 32],  # hidden widths / channels per block; a list of such lists for the ensembles
    "beta": 0.5,  # residual_cnn: out = act(beta*skip(x) + (1-beta)*F(x)), in [0, 1]
    "voting_method": "average",  # ensembles: average | random (random member per sample in training only)
    "dataset_name": "digits",  # digits (bundled, offline) | digits_flat | mnist | mini_mnist | cifar10 | ... | diabetes
    "data_root": "",  # folder of torchvision datasets ("" = <project>/data)
    "seed": 0,  # seeds the initial weights, the batch order and the active-block draws
    # --- optimisation ---
    "optimizer": "adam",  # adam | sgd (with momentum)
    "step_size": 0.01,  # learning rate
    "momentum": 0.9,  # sgd only
    "batch_size": 128,  # samples per mini-batch (per local step in block-wise modes); 0 = the largest that fits
    "rounds": 120,  # rounds to train (entire: one step per round; block-wise: K local steps per active block)
    "K": 1,  # local steps per block per round (block-wise modes)
    "block_update": "jacobi",  # jacobi (all blocks from the round's centre) | gauss_seidel (from the latest centre)
    "active_share": 1.0,  # share of blocks updated per round, in (0, 1]; a seeded random subset when < 1
    "gamma": 1.0,  # damping of the gather, in (0, 1]: centre <- centre + gamma*(update - centre)
    "communication_delay": 0.0,  # seconds slept in every communication stage (simulated network)
    "n_workers": 0,  # blockwise mode: worker processes (0 = one per block, capped at CPU cores or GPUs)
    "max_staleness": -1,  # async modes: bound s on how far a worker may run ahead (0 = synchronous, -1 = unbounded)
    "worker_speeds": [],  # async modes: relative time per local step, one per worker ([] = all 1.0)
    "step_time": 0.0,  # async_sequential: virtual seconds per local step at speed 1 (0 = measured)
    "cuda_core": 0,  # GPU index; -1 = CPU; a missing GPU falls back to the CPU with a warning
    # --- logging and measurement ---
    "report_sampling_rate": 10,  # rounds between progress checks (0 = only at start and end)
    "measurement_sampling_rate": 399,  # rounds between measurements, plus one at the end (0 = never, 1 = every round)
    "measurement_rounds": None,  # also measure at these rounds: a list such as [0,10,50], or log (0,1,3,10,30,...,end)
    "eval_samples": 2048,  # samples of the big training batch and of the test split used per progress check
    "plot_x": "samples",  # x-axis of the training curve: samples | round | steps | forward_sample_passes | wall_time
    "units_file": "",  # plugin list ("" = measurements/Units.txt)
    "output_root": "",  # folder that holds reports/, figures/, measurements/ ("" = the project folder)
    "tensorboard": False,  # also write TensorBoard event files to <output_root>/tensorboard/R<hash>/
    # --- stopping ---
    "early_stop_patience": 0,  # progress checks without improvement before stopping (0 = off)
    "early_stop_monitor": "test_loss",  # loss | accuracy | test_loss | test_accuracy
    "early_stop_min_delta": 0.0,  # an improvement must exceed this
    "target_monitor": "test_accuracy",  # metric of the target stopper
    "target_value": None,  # stop once target_monitor is strictly better than this (None = off)
    # --- run records ---
    "tag": "",  # a label that enters the run id, for deliberate repeats of one experiment
    "checkpoint_every": 20,  # rounds between checkpoints (0 = off); one more on SIGTERM/SIGINT when on
    "resume": "no",  # no | yes (also --resume alone) | auto (resume if this run has a checkpoint) | a run id R<hash>
    "settings_file": "",  # an earlier run's R<hash>.config.json: run that experiment again with exactly its settings
    "measure_only": "",  # a run id R<hash> (or one of its files): run the measurement units on its saved model
    "deterministic": False,  # torch.use_deterministic_algorithms(True), and cuDNN's deterministic flags on GPU
}


def _help_texts() -> dict[str, str]:
    texts = key_comments(Path(__file__).read_text())
    engines = "; ".join(f"{name} ({spec.summary})" for name, spec in sorted(ENGINES.items()))
    texts["training_mode"] = f"{texts['training_mode']}. Engines: {engines}"
    return texts


def precheck(argv: Sequence[str]) -> None:
    """Flag names and value types only (argparse exits 2, or 0 after ``--help``), before torch is imported."""
    parse_arguments(DEFAULTS, argv, help_texts=_help_texts(), prog="dol1.py", description=__doc__.split("\n\n")[0],
                    bare={"resume": "yes"})


if __name__ == "__main__":  # answer --help and a misspelled flag in a fraction of a second, not after torch's import
    precheck(sys.argv[1:])

# everything below imports torch
from src.utils import deterministic_kept, set_deterministic  # noqa: E402
from src.Buliding_Units.checkpoint import restore  # noqa: E402
from src.Buliding_Units.measurement_schedule import measuring  # noqa: E402
from src.Buliding_Units.Model_frames import Frame, device_note, generate_ModelFrame  # noqa: E402
from src.Buliding_Units.plugins import parse_units  # noqa: E402
from src.Buliding_Units.schedules import check_schedules  # noqa: E402
from src.Buliding_Units.runs import (RunFiles, check_writable, find_resume,  # noqa: E402
                                     draw_training_curve, measure_saved_model, read_config, recover_dead_holder,
                                     load_run, resume_notes, save_model, settings_defaults, units_text, write_config)
from src.Buliding_Units.StopperUnit import stoppers_from_settings  # noqa: E402
from src.Buliding_Units.tensorboard_log import with_tensorboard  # noqa: E402
from src.Optimizer_Engines import EngineSpec, resolve_engine  # noqa: E402
from src.Optimizer_Engines.run_settings import validate  # noqa: E402
from src.Optimizer_Engines.parallel.worker_plan import torchrun_rank  # noqa: E402
from src.records import RunClaim, RunLocked, experiment_id, reproducibility_record  # noqa: E402
from src.reporting import ATTEMPT_ENV, Paths, Reporter, format_progress  # noqa: E402

def resolve_config(argv: Sequence[str] | None = None, raise_errors: bool = False) -> dict[str, Any]:
    """Parse and validate ``argv``: ConfigError for bad values (argparse exits 2 unless ``raise_errors``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    H = parse_arguments(settings_defaults(argv, DEFAULTS), argv, help_texts=_help_texts(), prog="dol1.py",
                        description=__doc__.split("\n\n")[0], bare={"resume": "yes"}, raise_errors=raise_errors)
    if isinstance(H["target_value"], int) and not isinstance(H["target_value"], bool):
        H["target_value"] = float(H["target_value"])  # 1 and 1.0 are one experiment (and one run id)
    validate(H)
    return H


def run_identity(H: dict[str, Any]) -> str:
    """The run id of a resolved configuration (what ``master.py`` tracks runs by)."""
    return experiment_id(H, units_text(H)[0])


class _Progress:
    """tqdm on a terminal; plain progress lines otherwise (tqdm garbles redirected logs)."""

    def __init__(self, frame: Frame):
        self.frame, self.seen, self.bar = frame, len(frame.history), None
        if sys.stdout.isatty():
            from tqdm import tqdm  # only on a terminal
            self.bar = tqdm(total=frame.H["rounds"], unit="round", initial=frame.round)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if self.frame.history:
                self.bar.set_postfix(loss=f"{self.frame.history[-1]['loss']:.3g}")
            return
        for record in self.frame.history[self.seen:]:
            print(format_progress(record), flush=True)
        self.seen = len(self.frame.history)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self(self.frame.round, self.frame.H["rounds"])


def make_frame(H: dict[str, Any], spec: EngineSpec, units: tuple[str, str] | None = None) -> Frame:
    """Plugins and frame for a resolved configuration, writing nothing.

    Raises:
        ConfigError: a bad units file, data that cannot be loaded, a model that does not fit, a unit that
            cannot measure this model.
    """
    text, source = units or units_text(H)
    frame = generate_ModelFrame(H, units=stoppers_from_settings(H) + parse_units(text, source),
                                paths=Paths.for_output_root(H["output_root"]), block_copies=spec.block_copies)
    frame.run, frame.units_text = experiment_id(H, text), text
    try:
        check_schedules(frame.schedule_units)
        for unit in frame.measure_units + frame.schedule_units:
            unit.prepare(frame)
        if spec.check is not None:
            spec.check(frame)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return frame


def build(H: dict[str, Any], spec: EngineSpec, *, frame: Frame | None = None, resume: dict[str, Any] | None = None,
          record: dict[str, Any] | None = None) -> Frame:
    """The frame (``make_frame``'s, or a new one) with its reporter; restored from ``resume`` when given."""
    frame = frame if frame is not None else make_frame(H, spec)
    files = RunFiles(frame.paths, frame.run_id)
    text = frame.units_text
    if resume is not None:
        try:
            restore(frame, resume)
        except (RuntimeError, KeyError, ValueError, TypeError) as err:  # a file that verifies but does not fit
            raise ConfigError(f"--resume: the checkpoint {resume['_path']} does not fit this run: {err}") from err
    n_params = sum(p.numel() for p in frame.center_model.parameters())
    frame.reporter = Reporter(H, files.paths.reports, run=files.run, resume=resume is not None, run_info={
        "device": str(frame.device), "n_blocks": frame.n_blocks, "n_parameters": n_params,
        "batch_size": frame.H["batch_size"], "engine": f"{spec.function.__module__}.{spec.function.__qualname__}",
        "plugins": [repr(u) for u in frame.stopper_units] + ([repr(u) for u in frame.measure_units]
                                                             if measuring(H) else []),
        **({"not_run": f"{len(frame.measure_units)} measurement unit(s): measurement_sampling_rate is 0 and "
                       f"measurement_rounds is empty"} if frame.measure_units and not measuring(H) else {})},
        extra_header={"Reproducibility": record or {}, "Units": text},
        attempt=os.environ.get(ATTEMPT_ENV))  # a sweep master's token of this attempt, echoed for it to find
    if H["checkpoint_every"] > 0:
        frame.checkpointer = files.checkpointer()
    if resume is not None:
        frame.reporter.rewrite_metrics(frame.history)
    print(f"dol1.py: run {frame.run_id} ({H['training_mode']}, {H['model']} with {frame.n_blocks} blocks, "
          f"{n_params} parameters, on {frame.device}); report: {frame.reporter.path}", flush=True)
    return frame


def _summary(frame: Frame) -> str:
    last = frame.history[-1] if frame.history else {}
    values = ", ".join(f"{k} = {last[k]:.4g}" for k in ("loss", "accuracy", "test_loss", "test_accuracy")
                       if k in last and isinstance(last[k], float) and math.isfinite(last[k]))
    return (f"dol1.py: {frame.reporter.status} after {frame.round} rounds "
            f"({last.get('wall_time', 0.0):.1f} s): {values}")


def _signal_handlers(frame: Frame) -> dict[int, Any]:
    """SIGINT/SIGTERM: the first asks the loop to checkpoint and stop at the next round boundary, a second stops
    at once. Returns the previous handlers."""
    def handle(signum: int, _frame: Any) -> None:
        if frame.interrupt is not None:
            raise KeyboardInterrupt(f"signal {signum}")
        frame.interrupt = signum

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}


def train(frame: Frame, spec: EngineSpec, progress: Callable[[int, int], None] | None = None) -> Frame:
    """Run the engine, draw the training curve, save the model and close the report (finished, stopped, failed
    or interrupted)."""
    previous = _signal_handlers(frame)
    progress = with_tensorboard(frame, progress or _Progress(frame))  # progress itself when --tensorboard is off
    try:
        spec.run(frame, progress)
        if hasattr(progress, "close"):
            progress.close()
        draw_training_curve(frame)
        frame.log(f"Model: {save_model(frame, RunFiles(frame.paths, frame.run_id))}")
    except KeyboardInterrupt:
        for sig in previous:  # a second signal must not cut the closing of the report short
            signal.signal(sig, signal.SIG_IGN)
        if hasattr(progress, "close"):
            progress.close()
        name = signal.Signals(frame.interrupt).name if frame.interrupt else "SIGINT"
        saved = f"; resumable from the checkpoint at round {frame.round}" \
            if frame.checkpointer is not None and frame.checkpointed_round == frame.round else ""
        frame.reporter.finish("interrupted", f"{name}{saved}")
        print(f"dol1.py: interrupted ({name}); report: {frame.reporter.path}", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit as err:  # an engine that exits has not finished: the report and the exit status agree
        frame.reporter.fail(err, exit_code=1)
        raise SystemExit(1) from err
    except BaseException as err:
        frame.reporter.fail(err, exit_code=1)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = "diverged" if frame.stop_kind == "non_finite" else "stopped" if frame.stop_reason else "finished"
    frame.reporter.finish(status, frame.stop_reason)
    print(_summary(frame), flush=True)
    return frame


def open_run(H: dict[str, Any], spec: EngineSpec, argv: Sequence[str]) -> tuple[Frame, RunClaim]:
    """Claim the run, close a dead predecessor's report, find what to resume, build the frame.

    Raises:
        ConfigError: bad input (nothing written); RunLocked: the run is live elsewhere (nothing written).
    """
    units = units_text(H)
    text = units[0]
    files = RunFiles(Paths.for_output_root(H["output_root"]), experiment_id(H, text))
    check_writable(files.paths)
    resume = find_resume(files, H["resume"], H, text)
    frame = make_frame(H, spec, units)  # catches every remaining bad input before anything is written
    claim = RunClaim(files.paths.reports, files.run)
    try:
        if resume is not None:  # what was found before the claim may have finished meanwhile: look again
            resume = find_resume(files, H["resume"], H, text)
        previous = read_config(files.config) if resume is not None and files.config.exists() else None
        recovered = recover_dead_holder(files)
        record = reproducibility_record(argv, PROJECT_ROOT, H["deterministic"])
        frame = build(H, spec, frame=frame, resume=resume, record=record)
        write_config(files, H, text, record)
    except BaseException:
        claim.release()
        raise
    for note in [recovered] + resume_notes(frame, resume, previous, record):
        if note:
            frame.log(note)
    return frame, claim


def measure_only(H: dict[str, Any]) -> Frame:
    """Run the measurement units of ``--units_file`` once on the saved model of run ``H['measure_only']``."""
    frame, logs = measure_saved_model(H["measure_only"], H["output_root"] or None, *units_text(H))
    for unit, log in zip(frame.measure_units, logs):
        print(f"dol1.py: {type(unit).__name__} measured run {frame.run_id} at round {frame.round}: {log}")
    return frame


def main(argv: Sequence[str] | None = None, raise_errors: bool = False) -> Frame | None:
    """Run one experiment: resolve → open (claim, resume) → train; returns the trained Frame (None on a torchrun
    rank > 0). Bad input exits 2 and a live run 3, or they raise (ConfigError, RunLocked) with ``raise_errors``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        H = resolve_config(argv, raise_errors)
        spec = resolve_engine(H["training_mode"])
        if H["deterministic"]:
            set_deterministic()
        if (note := device_note(H["cuda_core"])) is not None:
            print(f"dol1.py: warning: {note}", file=sys.stderr)
        if H["measure_only"]:
            return measure_only(H)
        if spec.torchrun_worker is not None and torchrun_rank() > 0:
            spec.torchrun_worker(H)  # follow rank 0, write nothing
            return None
        frame, claim = open_run(H, spec, argv)
    except ConfigError as err:
        if raise_errors:
            raise
        print(f"dol1.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunLocked as err:
        if raise_errors:
            raise
        run = run_identity(H)
        print(f"dol1.py: error: run {run} is already running (pid {err}); report: "
              f"{Paths.for_output_root(H['output_root']).report(run)}", file=sys.stderr)
        raise SystemExit(3) from None
    try:
        return train(frame, spec)
    finally:
        claim.release()


def run(**settings: Any) -> Frame | None:
    """The notebook API: ``run(model="mlp", rounds=50)`` is ``python dol1.py --model mlp --rounds 50`` returning the
    Frame; a bad key or value raises the ConfigError the command line prints. Reopen runs with ``load_run``.
    ``deterministic=True`` holds for this run only (the process's settings are restored after it)."""
    with deterministic_kept():
        return main(settings_argv(settings), raise_errors=True)


if __name__ == "__main__":
    main()
