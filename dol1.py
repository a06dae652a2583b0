"""Run one experiment: every key of DEFAULTS is a command-line flag (``python dol1.py --help``).

    python dol1.py                                   # the default: block-wise training on the bundled digits
    python dol1.py --training_mode entire --rounds 500
    python dol1.py --training_mode blockwise --model cnn_ensemble --config "[[16,16],[32,32],[32,64]]" --rounds 50

Writes ``reports/R<hash>.txt`` (header + progress lines), ``reports/R<hash>.metrics.jsonl`` (one JSON record per
progress check), ``figures/training_curve_R<hash>.{pdf,png}`` and whatever the units in ``measurements/Units.txt``
write. Exit status: 0 finished or stopped by a stopper, 1 failed, 2 bad input (nothing written), 130 interrupted.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, Sequence

PROJECT_ROOT = Path(__file__).resolve().parent
if str(PROJECT_ROOT) not in sys.path:  # so that `python /elsewhere/dol1.py` finds `src`
    sys.path.insert(0, str(PROJECT_ROOT))

DEFAULTS: dict[str, Any] = {
    # --- what to train ---
    "training_mode": "blockwise_sequential",  # blockwise (one process per block) | blockwise_sequential | entire
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
    "cuda_core": 0,  # GPU index; -1 = CPU; a missing GPU falls back to the CPU with a warning
    # --- logging and measurement ---
    "report_sampling_rate": 10,  # rounds between progress checks (0 = only at start and end)
    "measurement_sampling_rate": 399,  # rounds between measurements, plus one at the end (0 = never, 1 = every round)
    "eval_samples": 2048,  # samples of the big training batch and of the test split used per progress check
    "units_file": "",  # plugin list ("" = measurements/Units.txt)
    "output_root": "",  # folder that holds reports/, figures/, measurements/ ("" = the project folder)
    # --- stopping ---
    "early_stop_patience": 0,  # progress checks without improvement before stopping (0 = off)
    "early_stop_monitor": "test_loss",  # loss | accuracy | test_loss | test_accuracy
    "early_stop_min_delta": 0.0,  # an improvement must exceed this
    "target_monitor": "test_accuracy",  # metric of the target stopper
    "target_value": None,  # stop once target_monitor is strictly better than this (None = off)
}

_CHOICES = {
    "training_mode": ("blockwise", "blockwise_sequential", "entire"),
    "block_update": ("gauss_seidel", "jacobi"),
    "voting_method": ("average", "random"),
}


def _check(condition: bool, message: str) -> None:
    from src.utils import ConfigError
    if not condition:
        raise ConfigError(message)


def validate(H: dict[str, Any]) -> None:
    """Check names and ranges without building anything; raises ConfigError naming the bad value and valid ones."""
    from src.Architectures.Models import MODELS
    from src.Buliding_Units.Model_frames import OPTIMIZERS
    from src.Data import DATASETS

    tables = {**_CHOICES, "model": MODELS, "dataset_name": DATASETS, "optimizer": OPTIMIZERS}
    for key, valid in tables.items():
        _check(H[key] in valid, f"--{key} {H[key]!r} is not valid; valid: {sorted(valid)}")
    _check(H["K"] >= 1, f"--K must be >= 1, got {H['K']}")
    _check(H["rounds"] >= 0, f"--rounds must be >= 0, got {H['rounds']}")
    _check(H["batch_size"] >= 0, f"--batch_size must be >= 1, or 0 for the largest that fits, got {H['batch_size']}")
    _check(H["step_size"] > 0, f"--step_size must be > 0, got {H['step_size']}")
    _check(0 < H["active_share"] <= 1, f"--active_share must be in (0, 1], got {H['active_share']}")
    _check(0 < H["gamma"] <= 1, f"--gamma must be in (0, 1], got {H['gamma']}")
    _check(0 <= H["beta"] <= 1, f"--beta must be in [0, 1], got {H['beta']}")
    _check(H["communication_delay"] >= 0, f"--communication_delay must be >= 0, got {H['communication_delay']}")
    _check(H["n_workers"] >= 0, f"--n_workers must be >= 0 (0 = auto), got {H['n_workers']}")
    _check(H["eval_samples"] >= 1, f"--eval_samples must be >= 1, got {H['eval_samples']}")
    for key in ("report_sampling_rate", "measurement_sampling_rate", "early_stop_patience"):
        _check(H[key] >= 0, f"--{key} must be >= 0, got {H[key]}")
    _check(isinstance(H["config"], list) and len(H["config"]) > 0,
           f"--config must be a non-empty list such as [8, 8] or [[16, 16], [32, 32]], got {H['config']!r}")
    _check(H["target_value"] is None or isinstance(H["target_value"], (int, float)),
           f"--target_value must be a number or None, got {H['target_value']!r}")
    _check(not (H["training_mode"] == "blockwise" and H["block_update"] == "gauss_seidel"),
           "--block_update gauss_seidel updates one block after another, so it cannot run in the multi-process "
           "--training_mode blockwise; use --training_mode blockwise_sequential (valid block updates for "
           "blockwise: ['jacobi'])")
    stoppers(H)


def stoppers(H: dict[str, Any]) -> list:
    """The stoppers asked for by H's keys; the non-finite check is always first."""
    from src.Buliding_Units.StopperUnit import EarlyStoppingStopper, NonFiniteStopper, TargetStopper
    from src.utils import ConfigError

    units: list = [NonFiniteStopper()]
    try:
        if H["early_stop_patience"] > 0:
            units.append(EarlyStoppingStopper(H["early_stop_monitor"], H["early_stop_patience"],
                                              H["early_stop_min_delta"]))
        if H["target_value"] is not None:
            units.append(TargetStopper(H["target_monitor"], H["target_value"]))
    except ValueError as err:
        raise ConfigError(f"stopper settings: {err}") from err
    return units


def resolve_config(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` against DEFAULTS and validate; argparse errors exit 2, other bad values raise ConfigError."""
    from src.utils import key_comments, parse_arguments
    H = parse_arguments(DEFAULTS, argv, help_texts=key_comments(Path(__file__).read_text()), prog="dol1.py",
                        description=__doc__.split("\n\n")[0])
    validate(H)
    return H


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _Progress:
    """tqdm on a terminal; plain progress lines otherwise (tqdm garbles redirected logs)."""

    def __init__(self, frame: Any):
        self.frame, self.seen, self.bar = frame, 0, None
        if sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=frame.H["rounds"], unit="round", initial=frame.round)

    def __call__(self, done: int, total: int) -> None:
        from src.Optimizer_Engines.BCD_engine import format_progress
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


def main(argv: Sequence[str] | None = None) -> Any:
    """Run one experiment; returns the trained Frame (history, models, stop reason)."""
    from src.Buliding_Units.Model_frames import Paths, generate_ModelFrame
    from src.Optimizer_Engines.BCD_engine import ENGINES
    from src.plots import training_curve
    from src.utils import ConfigError, Reporter, parse_measurement_units

    try:
        H = resolve_config(argv)
        if H["training_mode"] == "blockwise":
            from src.Optimizer_Engines.distributed_engine import torchrun_rank, torchrun_worker
            if torchrun_rank() > 0:  # torchrun rank > 0: follow rank 0, write nothing
                torchrun_worker(H)
                return None
        paths = Paths(Path(H["output_root"]).resolve() if H["output_root"] else PROJECT_ROOT)
        units = parse_measurement_units(H["units_file"] or PROJECT_ROOT / "measurements" / "Units.txt")
        frame = generate_ModelFrame(H, units=stoppers(H) + units, paths=paths)
        for unit in frame.measure_units:
            try:
                unit.prepare(frame)
            except ValueError as err:
                raise ConfigError(str(err)) from err
    except ConfigError as err:
        print(f"dol1.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

    n_params = sum(p.numel() for p in frame.center_model.parameters())
    frame.reporter = Reporter(H, paths.reports, run_info={
        "device": str(frame.device), "n_blocks": frame.n_blocks, "n_parameters": n_params,
        "batch_size": frame.H["batch_size"],
        "plugins": [repr(u) for u in frame.measure_units + frame.stopper_units]})
    print(f"dol1.py: run {frame.run_id} ({H['training_mode']}, {H['model']} with {frame.n_blocks} blocks, "
          f"{n_params} parameters, on {frame.device}); report: {frame.reporter.path}", flush=True)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM,)}
    progress = _Progress(frame)
    try:
        ENGINES[H["training_mode"]](frame, progress)
        progress.close()
        figure = paths.figures / f"training_curve_{frame.run_id}"
        training_curve(frame.history, figure, title=f"{frame.run_id}: {H['training_mode']}, {H['model']}")
        frame.log(f"Training curve: {figure}.pdf")
    except KeyboardInterrupt:
        progress.close()
        frame.reporter.finish("interrupted", "SIGINT/SIGTERM")
        print(f"dol1.py: interrupted; report: {frame.reporter.path}", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException as err:
        frame.reporter.fail(err, exit_code=1)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if frame.stop_reason:
        frame.reporter.finish("stopped", frame.stop_reason)
    else:
        frame.reporter.finish("finished")
    last = frame.history[-1]
    summary = ", ".join(f"{k} = {last[k]:.4g}" for k in ("loss", "accuracy", "test_loss", "test_accuracy")
                        if k in last)
    print(f"dol1.py: {frame.reporter.status} after {frame.round} rounds ({last['wall_time']:.1f} s): {summary}",
          flush=True)
    return frame


if __name__ == "__main__":
    main()
