"""Run one experiment: every key of DEFAULTS is a command-line flag (``python dol1.py --help``).

    python dol1.py                                   # the default: block-wise training on the bundled digits
    python dol1.py --training_mode entire --rounds 500
    python dol1.py --training_mode blockwise --model cnn_ensemble --config "[[16,16],[32,32],[32,64]]" --rounds 50

The path of a run: ``main`` → ``resolve_config`` (flags, checks) → ``open_run`` (claim the run id, build the frame,
open the report) → ``train`` (the engine, then the curve and the model). Writes ``reports/R<hash>.txt`` (header +
progress lines), ``reports/R<hash>.metrics.jsonl`` (one JSON record per progress check),
``figures/training_curve_R<hash>.{pdf,png}`` and whatever the units in ``measurements/Units.txt`` write; checkpoints
under ``checkpoints/R<hash>/`` and the model as ``reports/R<hash>.model.pt``. Exit status: 0 finished or stopped by a
stopper, 1 failed, 2 bad input (nothing written), 3 the same run is already running, 130 interrupted.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

PROJECT_ROOT = Path(__file__).resolve().parent
if str(PROJECT_ROOT) not in sys.path:  # so that `python /elsewhere/dol1.py` finds `src`
    sys.path.insert(0, str(PROJECT_ROOT))

from src.cli import ConfigError, key_comments, parse_arguments, settings_argv  # noqa: E402 - after the path fix above
from src.Optimizer_Engines import ENGINES  # noqa: E402 - names every engine, imports none (nor torch)

DEFAULTS: dict[str, Any] = {
    # --- what to train ---
    "training_mode": "blockwise_sequential",  # an engine of the table (see below) or a dotted path package.module.function
    "model": "residual_cnn",  # linear_nn | mlp | cnn | residual_cnn | cnn_ensemble | feedforward_ensemble | ResNet18 | ResNet34 | vit | gpt
    "config": [16, 32, 32],  # widths / channels per block; ensembles: a list of such lists; vit, gpt: equal widths ([64, 64] if not given)
    "beta": 0.5,  # residual_cnn: out = act(beta*skip(x) + (1-beta)*F(x)), in [0, 1]
    "voting_method": "average",  # ensembles: average | random (random member per sample in training only)
    "heads": 0,  # vit, gpt: attention heads per layer, a divisor of the width (0 = width // 16)
    "dataset_name": "digits",  # digits (bundled, offline) | digits_flat | mnist | mini_mnist | cifar10 | ... | diabetes | python_docs (text)
    "context": 64,  # gpt on python_docs only: characters per sample (the sequence length), 2..512
    "data_root": "",  # folder of torchvision datasets ("" = <project>/data)
    "seed": 0,  # seeds the initial weights, the batch order and the active-block draws
    # --- optimisation ---
    "optimizer": "adam",  # adam | sgd (with momentum)
    "step_size": 0.005,  # learning rate
    "momentum": 0.9,  # sgd only
    "batch_size": 128,  # samples per mini-batch (per local step in block-wise modes); 0 = the largest that fits
    "rounds": 200,  # rounds to train (entire: one step per round; block-wise: K local steps per active block)
    "K": 1,  # local steps per block per round (block-wise modes)
    "block_update": "jacobi",  # jacobi (all blocks from the round's centre) | gauss_seidel (from the latest centre)
    "block_order": "cyclic",  # which blocks, in which order: cyclic | reverse (BAdam's turns, up or down) | random
    "active_share": 1.0,  # share of blocks updated per round, in (0, 1]; which ones: --block_order
    "gamma": 1.0,  # damping of the gather, in (0, 1]: centre <- centre + gamma*(update - centre)
    "link_latency": 0.0,  # simulated network: seconds per message (latency + bytes / bandwidth; see docs/modes.md)
    "link_bandwidth": 0.0,  # simulated network: bytes per second of a link (0 = infinite)
    "communication_delay": 0.0,  # deprecated name of link_latency (seconds per message)
    "n_workers": 0,  # blockwise and async modes: worker processes (0 = one per block; blockwise caps it at the cores)
    "max_staleness": -1,  # async modes: bound s on how far a worker may run ahead (0 = synchronous, -1 = unbounded)
    "worker_speeds": [],  # async modes: relative time per local step, one per worker ([] = all 1.0)
    "step_time": 0.0,  # async_sequential: virtual seconds per local step at speed 1 (0 = measured)
    "cuda_core": 0,  # GPU index; -1 = CPU; a missing GPU falls back to the CPU with a warning
    # --- logging and measurement ---
    "report_sampling_rate": 10,  # rounds between progress checks (0 = only at start and end)
    "measurement_sampling_rate": 399,  # rounds between measurements, plus one at the end (0 = never, 1 = every round)
    "measurement_rounds": None,  # also measure at these rounds: a list such as [0,10,50], or log (0,1,3,10,30,...,end)
    "eval_samples": 2048,  # samples of the big training batch and of the test split used per progress check
    "plot_x": "samples",  # x-axis of the training curve: samples | round | steps | train_time | … (docs/keys.md)
    "units_file": "",  # plugin list ("" = measurements/Units.txt)
    "output_root": "",  # folder that holds reports/, figures/, measurements/ ("" = the project folder)
    "tensorboard": False,  # also write TensorBoard event files to <output_root>/tensorboard/R<hash>/
    # --- stopping ---
    "targets": {},  # record when each is first reached, e.g. {'test_accuracy': 0.95, 'loss': 0.1} (>= for accuracies)
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


def _stopped_while_importing(signum: int, _frame: Any) -> None:
    print(f"dol1.py: interrupted during start-up ({signal.Signals(signum).name}); nothing trained", file=sys.stderr)
    os._exit(130)  # nothing is written before the imports end


if __name__ == "__main__":  # answer --help and a misspelled flag in a fraction of a second, not after torch's import
    precheck(sys.argv[1:])
    for _sig in (signal.SIGINT, signal.SIGTERM):  # torch's import takes seconds: a stop meanwhile is a clean exit
        signal.signal(_sig, _stopped_while_importing)

# everything below imports torch
from src.Architectures.Models import DEFAULT_CONFIGS, MODELS, task_mismatch  # noqa: E402
from src.Buliding_Units.measurement_schedule import measuring, parse_measurement_rounds  # noqa: E402
from src.Buliding_Units.Model_frames import (OPTIMIZERS, Frame, RunContext, device_note,  # noqa: E402
                                             generate_ModelFrame)
from src.Buliding_Units.plugins import DEFAULT_UNITS_FILE, parse_units, read_units_text  # noqa: E402
from src.Buliding_Units.schedules import check_schedules  # noqa: E402
from src.Buliding_Units.StopperUnit import stoppers_from_settings  # noqa: E402
from src.Data import DATASETS  # noqa: E402
from src.Optimizer_Engines import EngineSpec, resolve_engine, torchrun_world  # noqa: E402
from src.Optimizer_Engines.BCD_engine import BLOCK_UPDATES  # noqa: E402
from src.Optimizer_Engines.loop import BLOCK_ORDERS, TARGET_METRICS  # noqa: E402
from src.plots import X_AXES, training_curve  # noqa: E402
from src.records import RESUME_MODES, RunClaim, RunLocked, experiment_id, reproducibility_record  # noqa: E402
from src.reporting import (ATTEMPT_ENV, Paths, Reporter, format_progress, recover_dead_holder,  # noqa: E402
                           write_config)
from src.utils import deterministic_kept, set_deterministic  # noqa: E402

import torch  # noqa: E402 - after the project's imports, which import it anyway

MAX_CONTEXT = 512
# the valid names of the keys with a table, read live from the tables (no comment on these lines: --help reads the
# trailing comments of "key": lines as help texts)
CHOICES = {"block_update": BLOCK_UPDATES, "block_order": BLOCK_ORDERS, "voting_method": ("average", "random"),
           "model": MODELS, "dataset_name": DATASETS, "optimizer": OPTIMIZERS, "plot_x": X_AXES}
AT_LEAST = {"K": 1, "rounds": 0, "batch_size": 0, "n_workers": 0, "eval_samples": 1, "report_sampling_rate": 0,
            "measurement_sampling_rate": 0, "early_stop_patience": 0, "communication_delay": 0, "checkpoint_every": 0,
            "max_staleness": -1, "step_time": 0, "early_stop_min_delta": 0, "link_latency": 0, "link_bandwidth": 0,
            "heads": 0, "context": 2}
RANGES = {"step_size": (lambda v: v > 0, "> 0"), "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
          "active_share": (lambda v: 0 < v <= 1, "in (0, 1]"), "gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
          "beta": (lambda v: 0 <= v <= 1, "in [0, 1]"), "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32 - 1]"),
          "communication_delay": (lambda v: v <= 3600, "seconds per message, at most 3600"),
          "link_latency": (lambda v: v <= 3600, "seconds per message, at most 3600"),
          "context": (lambda v: v <= MAX_CONTEXT, f"at most {MAX_CONTEXT} characters (attention memory grows with its "
                      "square: a batch of 128 windows of 512 holds 0.5 GB of attention scores per layer)")}


def validate(H: dict[str, Any]) -> EngineSpec:
    """Check names and ranges without building anything; returns the engine of ``H['training_mode']``.

    Raises:
        ConfigError: naming the bad value and the valid ones.
    """
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)
    for key, value in H.items():
        check(not isinstance(value, float) or math.isfinite(value),
              f"--{key} {value!r} is not a finite number (NaN and infinities are refused)")
    spec = resolve_engine(H["training_mode"])
    for key, valid in CHOICES.items():
        check(H[key] in valid, f"--{key} {H[key]!r} is not valid; valid: {sorted(valid)}")
    for key, low in AT_LEAST.items():
        check(H[key] >= low, f"--{key} must be >= {low}, got {H[key]}")
    for key, (ok, text) in RANGES.items():
        check(ok(H[key]), f"--{key} must be {text}, got {H[key]}")
    check(isinstance(H["config"], list) and len(H["config"]) > 0,
          f"--config must be a non-empty list such as [8, 8] or [[16, 16], [32, 32]], got {H['config']!r}")
    mismatch = task_mismatch(H["model"], H["dataset_name"], DATASETS[H["dataset_name"]].task)
    check(mismatch is None, str(mismatch))
    check(H["target_value"] is None or isinstance(H["target_value"], (int, float))
          and not isinstance(H["target_value"], bool), f"--target_value must be a number or None, got "
                                                        f"{H['target_value']!r}")
    check(H["target_value"] is None or not H["target_monitor"].endswith("accuracy") or 0 <= H["target_value"] <= 1,
          f"--target_value {H['target_value']} for the accuracy monitor --target_monitor {H['target_monitor']} "
          f"must be in [0, 1]")
    check(not (H["link_latency"] and H["communication_delay"]), "--communication_delay is the deprecated name of "
          "--link_latency: give one of them")
    check(isinstance(H["targets"], dict) and all(k in TARGET_METRICS and isinstance(v, (int, float))
                                                 and not isinstance(v, bool) and math.isfinite(v)
                                                 and (not k.endswith("accuracy") or 0 <= v <= 1)
                                                 for k, v in H["targets"].items()),
          f"--targets must map metrics {list(TARGET_METRICS)} to finite numbers (accuracies in [0, 1]), got "
          f"{H['targets']!r}; e.g. \"{{'test_accuracy': 0.95, 'loss': 0.1}}\"")
    check(H["cuda_core"] >= -1, f"--cuda_core must be a GPU index >= 0, or -1 for the CPU; got {H['cuda_core']}")
    check(isinstance(H["worker_speeds"], list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in H["worker_speeds"]),
        f"--worker_speeds must be a list of numbers > 0 (relative time per local step, one per worker), got "
        f"{H['worker_speeds']!r}")
    check(not spec.block_updates or H["block_update"] in spec.block_updates,
          f"--block_update {H['block_update']} cannot run in --training_mode {spec.name}; valid block updates "
          f"for {spec.name}: {list(spec.block_updates)} (gauss_seidel updates one block after another: use "
          f"--training_mode blockwise_sequential)")
    try:
        parse_measurement_rounds(H["measurement_rounds"], H["rounds"])
    except ValueError as err:
        raise ConfigError(f"--{err}") from err
    check(H["resume"] in RESUME_MODES or re.fullmatch(r"R[0-9a-f]{8}", H["resume"]) is not None,
          f"--resume {H['resume']!r} is not valid; valid: {list(RESUME_MODES)} or a run id such as R1a2b3c4d")
    check(not H["tensorboard"] or importlib.util.find_spec("tensorboard") is not None,
          "--tensorboard true needs the tensorboard package, which is not installed: python -m pip install "
          "tensorboard (pinned in requirements.txt), or run with --tensorboard false")
    check(torchrun_world() == 1 or spec.torchrun_worker is not None,
          f"--training_mode {spec.name} runs in one process; under torchrun with WORLD_SIZE={torchrun_world()} it "
          f"would run {torchrun_world()} identical copies. Use a multi-process mode "
          f"({sorted(n for n, s in ENGINES.items() if s.torchrun_worker)}) or run without torchrun")
    if any(k.startswith("SLURM_") for k in os.environ):  # srun with several tasks but no torchrun: refused
        from src.Optimizer_Engines.parallel.ddp_engine import check_slurm_tasks
        check_slurm_tasks()
    stoppers_from_settings(H)
    return spec


def resolve_config(argv: Sequence[str] | None = None, raise_errors: bool = False) -> dict[str, Any]:
    """Parse and validate ``argv``: ConfigError for bad values (argparse exits 2 unless ``raise_errors``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = DEFAULTS
    if any(a.startswith("--settings_file") for a in argv):
        from src.Runs.resume import settings_defaults  # an earlier run's recorded settings (run-records wing)
        defaults = settings_defaults(argv, DEFAULTS)
    H = parse_arguments(defaults, argv, help_texts=_help_texts(), prog="dol1.py",
                        description=__doc__.split("\n\n")[0], bare={"resume": "yes"}, raise_errors=raise_errors)
    if isinstance(H["target_value"], int) and not isinstance(H["target_value"], bool):
        H["target_value"] = float(H["target_value"])  # 1 and 1.0 are one experiment (and one run id)
    if H["model"] in DEFAULT_CONFIGS and H["config"] == DEFAULTS["config"] and not any(
            a == "--config" or a.startswith("--config=") for a in argv):
        H["config"] = list(DEFAULT_CONFIGS[H["model"]])  # the shared default suits the CNNs, not a Transformer
    validate(H)
    if H["communication_delay"]:  # the deprecated name: recorded (and identified) as the latency it is
        H["link_latency"], H["communication_delay"] = H["communication_delay"], 0.0
        print("dol1.py: warning: --communication_delay is the deprecated name of --link_latency (seconds per "
              "message); recorded as link_latency", file=sys.stderr)
    return H


def units_text(H: dict[str, Any]) -> tuple[str, str]:
    """The text of the run's units file and where it comes from: the recorded text of ``--settings_file`` (unless
    ``--units_file`` names another file), else the units file."""
    if H["settings_file"]:
        from src.Runs.resume import recorded_units
        if (recorded := recorded_units(H)) is not None:
            return recorded
    path = H["units_file"] or DEFAULT_UNITS_FILE
    return read_units_text(path), str(path)


def run_identity(H: dict[str, Any]) -> str:
    """The run id of a resolved configuration (what ``master.py`` tracks runs by)."""
    return experiment_id(H, units_text(H)[0])


def make_frame(H: dict[str, Any], spec: EngineSpec, units: tuple[str, str] | None = None,
               run: RunContext | None = None) -> Frame:
    """Plugins and frame for a resolved configuration, writing nothing.

    Raises:
        ConfigError: a bad units file, data that cannot be loaded, a model that does not fit, a unit that cannot
            measure this model.
    """
    text, source = units or units_text(H)
    run = run or RunContext(experiment_id(H, text), Paths.for_output_root(H["output_root"]))
    run.units_text = text
    frame = generate_ModelFrame(H, units=stoppers_from_settings(H) + parse_units(text, source), run=run,
                                block_copies=spec.block_copies)
    unit = None
    try:
        check_schedules(frame.schedule_units)
        for unit in frame.measure_units + frame.schedule_units:
            unit.prepare(frame)
        unit = None
        if spec.check is not None:
            spec.check(frame)
    except ValueError as err:
        where = getattr(unit, "units_line", None)
        raise ConfigError(f"{where}: {type(unit).__name__}: {err}" if where else str(err)) from err
    return frame


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


def load_note(H: dict[str, Any], n_blocks: int) -> str | None:
    """A sentence when the run starts on a loaded machine: a load average above the cores, or more processes than
    cores (a multi-process engine's workers, and the asynchronous server): its timings then measure the contention."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = H["n_workers"] or n_blocks
    processes = {"blockwise": min(workers, cores) if not H["n_workers"] else workers, "async": workers + 1}.get(
        H["training_mode"], 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if processes <= cores and load <= cores:
        return None
    why = f"{processes} processes on {cores} cores" if processes > cores else f"load average {load:.1f} on {cores} cores"
    return f"{why}: time measurements (wall, compute, communication) include the contention"


def earlier_checkpoint_note(run: RunContext) -> str | None:
    """A line (also on stderr) when an earlier attempt of this run left checkpoints that this fresh start does not use
    (``--resume no``, the default): the attempt is kept aside, not lost, and ``--resume yes`` would continue it."""
    found = sorted(run.paths.checkpoints(run.id).glob("round_*.pt"))
    if not found:
        return None
    note = (f"Note: an earlier attempt of {run.id} left a checkpoint ({found[-1].stem}); this attempt starts over "
            f"(--resume no, the default) and keeps the earlier one aside; --resume yes would continue from it")
    print(f"dol1.py: {note[6:]}", file=sys.stderr, flush=True)
    return note


def open_run(H: dict[str, Any], spec: EngineSpec, argv: Sequence[str]) -> tuple[Frame, RunClaim]:
    """Claim the run id, close a dead predecessor's report, find what to resume, build the frame, open the report.

    Raises:
        ConfigError: bad input (nothing written); RunLocked: the run is live elsewhere (nothing written).
    """
    text, source = units_text(H)
    run = RunContext(experiment_id(H, text), Paths.for_output_root(H["output_root"]))
    run.paths.check_writable()
    resuming = None
    if H["resume"] != "no":
        from src.Runs import resume as resuming  # checkpoints and resume: the run-records wing
        resuming.find_resume(run.paths, run.id, H["resume"], H, text)  # a bad --resume is refused before any write
    frame = make_frame(H, spec, (text, source), run)  # catches every remaining bad input before anything is written
    claim = RunClaim(run.paths.reports, run.id)
    try:
        notes = [recover_dead_holder(run.paths, run.id)]
        record = reproducibility_record(argv, PROJECT_ROOT, H["deterministic"])
        # found again under the claim: the run may have ended since
        payload = resuming.find_resume(run.paths, run.id, H["resume"], H, text) if resuming else None
        if payload is not None:
            resuming.restore_run(frame, payload)
            notes += resuming.resume_notes(frame, payload, record)
        if payload is None and H["resume"] == "no":
            notes.append(earlier_checkpoint_note(run))
        n_params = sum(p.numel() for p in frame.center_model.parameters())
        if (note := load_note(H, frame.n_blocks)) is not None:
            notes.append(f"Warning: {note}")
            print(f"dol1.py: warning: {note}", flush=True)
        batch = frame.train_batches.batch_size  # a batch size above the training set is clamped to it
        if batch != frame.H["batch_size"]:
            notes.append(f"Warning: --batch_size {frame.H['batch_size']} is above the {batch} training samples: "
                         f"every batch is the whole training set (effective batch size {batch})")
            print(f"dol1.py: warning: {notes[-1][9:]}", file=sys.stderr)
        run.reporter = Reporter(H, run.paths.reports, run=run.id, resume=payload is not None, run_info={
            "device": str(frame.device), "n_blocks": frame.n_blocks, "n_parameters": n_params,
            "batch_size": batch, "engine": spec.path,
            "plugins": [repr(u) for u in frame.stopper_units] + ([repr(u) for u in frame.measure_units]
                                                                 if measuring(H) else []),
            **({"not_run": f"{len(frame.measure_units)} measurement unit(s): measurement_sampling_rate is 0 and "
                           f"measurement_rounds is empty"} if frame.measure_units and not measuring(H) else {})},
            extra_header={"Reproducibility": record, "Units": text}, attempt=os.environ.get(ATTEMPT_ENV))
        if payload is not None:
            run.reporter.rewrite_metrics(frame.history)  # drop what an interrupted attempt wrote after its checkpoint
        if H["checkpoint_every"] > 0:
            from src.Runs.checkpoint import Checkpointer
            run.checkpointer = Checkpointer(run.paths.checkpoints(run.id))
        write_config(run.paths, run.id, H, text, record)
    except BaseException as err:
        if run.reporter is not None:  # the report exists: it must not stay "alive"
            run.reporter.finish("interrupted", "during start-up") if isinstance(err, KeyboardInterrupt) \
                else run.reporter.fail(err)
        claim.release()
        raise
    for note in notes:
        if note:
            frame.log(note)
    print(f"dol1.py: run {run.id} ({H['training_mode']}, {H['model']} with {frame.n_blocks} blocks, {n_params} "
          f"parameters, on {frame.device}); report: {run.reporter.path}", flush=True)
    return frame, claim


def _signal_handlers(frame: Frame) -> dict[int, Any]:
    """SIGINT/SIGTERM: the first asks the loop to checkpoint and stop at the next round boundary, a second stops
    at once. Returns the previous handlers."""
    def handle(signum: int, _frame: Any) -> None:
        if frame.run.interrupt is not None:
            raise KeyboardInterrupt(f"signal {signum}")
        frame.run.interrupt = signum

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}


def _finish_files(frame: Frame) -> None:
    """The training curve (a figure that cannot be written is a warning) and the model, written atomically."""
    figure = frame.paths.figures / f"training_curve_{frame.run_id}"
    try:
        drawn = training_curve(frame.history, figure, x=frame.H.get("plot_x", "samples"),
                               title=f"{frame.run_id}: {frame.H['training_mode']}, {frame.H['model']}")
        frame.log(f"Training curve: {figure}.pdf" if drawn else "No training curve: the engine logged no progress "
                  "(engines log through training_loop or log_progress)")
    except OSError as err:
        frame.log(f"Warning: the training curve could not be written to {figure}.pdf: {err}")
    model = frame.paths.model(frame.run_id)
    tmp = model.with_name(model.name + f".tmp{os.getpid()}")
    try:
        torch.save(frame.center_model.state_dict(), tmp)
        os.replace(tmp, model)
    finally:
        tmp.unlink(missing_ok=True)
    frame.log(f"Model: {model}")


def train(frame: Frame, spec: EngineSpec, progress: Callable[[int, int], None] | None = None) -> Frame:
    """Run the engine, draw the training curve, save the model and close the report (finished, stopped, failed
    or interrupted)."""
    previous = _signal_handlers(frame)
    progress = progress or _Progress(frame)
    if frame.H["tensorboard"]:
        from src.Runs.tensorboard import TensorBoardLog  # event files from the run's records (run-records wing)
        progress = TensorBoardLog(frame, progress)
    try:
        spec.run(frame, progress)
        if hasattr(progress, "close"):
            progress.close()
        _finish_files(frame)
    except KeyboardInterrupt:
        for sig in previous:  # a second signal must not cut the closing of the report short
            signal.signal(sig, signal.SIG_IGN)
        if hasattr(progress, "close"):
            progress.close()
        name = signal.Signals(frame.run.interrupt).name if frame.run.interrupt else "SIGINT"
        saved = f"; resumable from the checkpoint at round {frame.round}" \
            if frame.run.checkpointer is not None and frame.run.checkpointed_round == frame.round else ""
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
    last = frame.history[-1] if frame.history else {}
    values = ", ".join(f"{k} = {last[k]:.4g}" for k in ("loss", "accuracy", "test_loss", "test_accuracy",
                                                      "test_bits_per_char")
                       if isinstance(last.get(k), float) and math.isfinite(last[k]))
    print(f"dol1.py: {status} after {frame.round} rounds ({last.get('wall_time', 0.0):.1f} s): {values}", flush=True)
    return frame


def measure_only(H: dict[str, Any]) -> Frame:
    """Run the measurement units of ``--units_file`` once on the saved model of run ``H['measure_only']``."""
    from src.Runs.reopen import measure_saved_model  # reopening a run: the run-records wing
    frame, logs = measure_saved_model(H["measure_only"], H["output_root"] or None, *units_text(H))
    for unit, log in zip(frame.measure_units, logs):
        print(f"dol1.py: {type(unit).__name__} measured run {frame.run_id} at round {frame.round}: {log}")
    return frame


@contextlib.contextmanager
def _interrupts() -> Iterator[None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt while the run starts (``train`` then takes them over); the
    previous handlers come back at the end (main thread only: elsewhere signals are left alone)."""
    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    previous = {}
    with contextlib.suppress(ValueError):
        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None, raise_errors: bool = False) -> Frame | None:
    """Run one experiment: resolve → open (claim, resume) → train; returns the trained Frame (None on a torchrun
    rank > 0). Bad input exits 2 and a live run 3, or they raise (ConfigError, RunLocked) with ``raise_errors``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with _interrupts():
        H, spec, frame, claim = _start(argv, raise_errors)
        if claim is not None:
            try:
                return train(frame, spec)  # it takes the signals over for the run's closing
            except KeyboardInterrupt:  # a signal in the instant before train took the signals over
                if frame.reporter.status == "alive":
                    frame.reporter.finish("interrupted", "before training started")
                raise SystemExit(130) from None
            finally:
                claim.release()
    if spec.torchrun_worker is not None and not H["measure_only"]:
        spec.torchrun_worker(H)  # a torchrun rank > 0 follows rank 0 and writes nothing
    return frame


def _start(argv: list[str], raise_errors: bool) -> tuple[dict[str, Any], EngineSpec, Frame | None, RunClaim | None]:
    """Resolve and open the run (bad input exits 2, a live run 3, an interrupt 130); no claim: nothing to train
    here (``--measure_only`` measured, or a torchrun rank > 0)."""
    try:
        H = resolve_config(argv, raise_errors)
        spec = resolve_engine(H["training_mode"])
        if H["deterministic"]:
            set_deterministic()
        if (note := device_note(H["cuda_core"])) is not None:
            print(f"dol1.py: warning: {note}", file=sys.stderr)
        if H["measure_only"]:
            return H, spec, measure_only(H), None
        if spec.torchrun_worker is not None and int(os.environ.get("RANK", "0")) > 0:
            return H, spec, None, None
        return (H, spec, *open_run(H, spec, argv))
    except KeyboardInterrupt as err:  # SIGINT or SIGTERM before training: nothing was trained, nothing to resume
        if raise_errors:
            raise
        print(f"dol1.py: interrupted during start-up ({err or 'SIGINT'}); nothing trained", file=sys.stderr)
        raise SystemExit(130) from None
    except ConfigError as err:
        if raise_errors:
            raise
        print(f"dol1.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunLocked as err:
        if raise_errors:
            raise
        print(f"dol1.py: error: run {run_identity(H)} is already running (pid {err}); report: "
              f"{Paths.for_output_root(H['output_root']).report(run_identity(H))}", file=sys.stderr)
        raise SystemExit(3) from None


def load_run(*args: Any, **kwargs: Any) -> Any:
    """Reopen a run (settings, status, history, model, latest checkpoint): ``src.Runs.reopen.load_run``."""
    from src.Runs.reopen import load_run as reopen
    return reopen(*args, **kwargs)


def run(**settings: Any) -> Frame | None:
    """The notebook API: ``run(model="mlp", rounds=50)`` is ``python dol1.py --model mlp --rounds 50`` returning the
    Frame; a bad key or value raises the ConfigError the command line prints. Reopen runs with ``load_run``.
    ``deterministic=True`` holds for this run only (the process's settings are restored after it)."""
    with deterministic_kept():
        return main(settings_argv(settings), raise_errors=True)


if __name__ == "__main__":
    main()
