"""The files of one run and what a script does with them: output checks, recovery, resume, saved model, reloading.

Files of run ``R<hash>`` under the output root (see ``src/reporting.py`` for the report, status and metrics):
``reports/R<hash>.config.json`` (resolved settings, units text, reproducibility record), ``reports/R<hash>.lock``
(held while the run lives), ``reports/R<hash>.model.pt`` (the centre model's ``state_dict`` at the end; ResNets in
torchvision's keys) and ``checkpoints/R<hash>/round_<r>.pt``.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from src.Buliding_Units.checkpoint import CheckpointError, Checkpointer
from src.Buliding_Units.Model_frames import Frame, generate_ModelFrame
from src.Buliding_Units.plugins import DEFAULT_UNITS_FILE, parse_units, read_units_text
from src.cli import ConfigError, check_value
from src.records import differing_keys, identity
from src.plots import training_curve
from src.reporting import Paths, read_metrics, read_status, write_json_atomic, write_status

RESUME_MODES = ("no", "yes", "auto")  # or a run id R<hash>


@dataclass(frozen=True)
class RunFiles:
    """Where run ``run`` keeps its files under ``paths``."""

    paths: Paths
    run: str

    @property
    def config(self) -> Path:
        return self.paths.reports / f"{self.run}.config.json"

    @property
    def model(self) -> Path:
        return self.paths.reports / f"{self.run}.model.pt"

    @property
    def report(self) -> Path:
        return self.paths.report(self.run)

    @property
    def checkpoints(self) -> Path:
        return self.paths.root / "checkpoints" / self.run

    def checkpointer(self) -> Checkpointer:
        return Checkpointer(self.checkpoints)


def check_writable(paths: Paths) -> None:
    """Check, creating nothing, that the output folders can be created and written: each one, or its deepest
    existing ancestor, must be a folder in which a temporary file can be made.

    Raises:
        ConfigError: the output root (or a folder on the way) is a file, or a folder cannot be written.
    """
    for folder in (paths.reports, paths.figures, paths.measurements, paths.root / "checkpoints"):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(20, f"{str(existing)!r} is a file, not a folder")
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            raise ConfigError(f"--output_root {str(paths.root)!r}: cannot write to {str(folder)!r} "
                              f"({err.strerror or err})") from err


def write_config(files: RunFiles, H: Mapping[str, Any], units_text: str, record: Mapping[str, Any]) -> None:
    """``R<hash>.config.json``: what ``dol1.py --settings_file`` needs to run the experiment again exactly."""
    write_json_atomic(files.config, {"run_id": files.run, "settings": dict(H), "units_text": units_text,
                                     "identity_excludes_placement": True, "reproducibility": dict(record)})


def read_config(path: Path) -> dict[str, Any]:
    """A run's config file.

    Raises:
        ConfigError: missing or not a config file.
    """
    if not Path(path).is_file():
        raise ConfigError(f"the run config {str(path)!r} " + ("is not a file" if Path(path).exists()
                                                                else "does not exist"))
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the run config {str(path)!r}: {err}") from err
    if not isinstance(config, dict) or not isinstance(config.get("settings"), dict):
        raise ConfigError(f"{str(path)!r} is not a run config (no 'settings')")
    return config


def recover_dead_holder(files: RunFiles) -> str | None:
    """Close the report of an earlier holder of this run that died without closing it (call with the claim held).

    Returns:
        A sentence for the new report, or None when there was nothing to recover.
    """
    state = read_status(files.paths.reports, files.run)
    if state is None or state.get("status") != "alive" or state.get("pid") == os.getpid():
        return None
    detail = (f"died: process {state.get('pid')} ended without closing its report (SIGKILL, out of memory or "
              f"power loss); found by the next run of {files.run}")
    write_status(files.paths.reports, files.run, "failed", detail, pid=state.get("pid"),
                 attempt=state.get("attempt"))
    return f"The previous attempt (pid {state.get('pid')}) had died without closing its report: marked failed"


def _similar_runs(files: RunFiles, H: Mapping[str, Any], units_text: str) -> list[tuple[str, list[str]]]:
    """Runs of the same output root that have checkpoints, with the experiment keys in which they differ."""
    found = []
    for folder in sorted((files.paths.root / "checkpoints").glob("R*")):
        config = files.paths.reports / f"{folder.name}.config.json"
        if folder.name == files.run or not config.exists() or not any(folder.glob("round_*.pt")):
            continue
        other = read_config(config)
        keys = differing_keys(identity(other["settings"], other.get("units_text", "")), identity(H, units_text))
        found.append((folder.name, keys))
    return sorted(found, key=lambda item: len(item[1]))


def find_resume(files: RunFiles, mode: str, H: Mapping[str, Any], units_text: str) -> dict[str, Any] | None:
    """The checkpoint payload to resume from (None = start fresh), for ``--resume mode``.

    Raises:
        ConfigError: ``yes`` (or a run id) without a usable checkpoint; a run id whose settings differ (the keys
            are named).
    """
    if mode == "no":
        return None
    state = read_status(files.paths.reports, files.run) or {}
    if state.get("status") in ("finished", "stopped"):
        if mode == "auto":
            return None  # nothing left to resume: a fresh run (the finished one is archived)
        raise ConfigError(f"--resume: run {files.run} has {state['status']} already; nothing to resume "
                          f"(report: {str(files.report)!r})")
    if mode not in ("yes", "auto"):  # a run id: its settings must be these
        other = RunFiles(files.paths, mode)
        if not other.config.exists():
            raise ConfigError(f"--resume {mode}: no run config {str(other.config)!r}; valid: {list(RESUME_MODES)} "
                              f"or the id of a run with a config in {str(files.paths.reports)!r}")
        config = read_config(other.config)
        keys = differing_keys(identity(config["settings"], config.get("units_text", "")), identity(H, units_text))
        if keys:
            raise ConfigError(f"--resume {mode}: refused, these experiment settings differ from that run's: {keys} "
                              f"(run it again with the same settings, or start a new run without --resume)")
    try:
        payload, path, problems = files.checkpointer().latest(files.run)
    except CheckpointError as err:
        if mode == "auto":
            return None
        similar = [f"{run} differs in {keys}" for run, keys in _similar_runs(files, H, units_text)[:3]]
        raise ConfigError(f"--resume: nothing to resume for run {files.run}: {err}"
                          + (f"; runs with checkpoints here: {'; '.join(similar)}" if similar else "")) from err
    payload["_path"], payload["_problems"] = str(path), problems
    return payload


def save_model(frame: Frame, files: RunFiles) -> Path:
    """Write the centre model's state_dict as ``R<hash>.model.pt`` (atomically)."""
    tmp = files.model.with_name(files.model.name + f".tmp{os.getpid()}")
    torch.save(frame.center_model.state_dict(), tmp)
    os.replace(tmp, files.model)
    return files.model


@dataclass
class RunRecord:
    """A finished (or interrupted) run, reopened: see :func:`load_run`."""

    run_id: str
    settings: dict[str, Any]
    config: dict[str, Any]
    status: dict[str, Any] | None
    history: list[dict[str, Any]]
    model: nn.Module | None
    checkpoint: dict[str, Any] | None
    files: RunFiles


def _locate(run_or_path: str | Path, output_root: str | Path | None) -> RunFiles:
    text = str(run_or_path)
    path = Path(text)
    if path.suffix or os.sep in text:  # a file of the run: R<hash>.txt, .config.json, .model.pt, …
        run = path.name.split(".")[0]
        return RunFiles(Paths(path.resolve().parent.parent), run)
    return RunFiles(Paths.for_output_root(output_root), text)


def load_run(run_or_path: str | Path, output_root: str | Path | None = None, *,
             device: str | torch.device = "cpu") -> RunRecord:
    """Reopen a run: its settings, status, history, the saved model (built and loaded) and its latest checkpoint.

    Args:
        run_or_path: a run id ``R<hash>`` (looked up under ``output_root``) or the path of one of its files.
        output_root: the ``--output_root`` of the run (default: the project folder).
        device: where to build the model.

    Raises:
        ConfigError: no config file for that run.
    """
    files = _locate(run_or_path, output_root)
    config = read_config(files.config)
    settings = dict(config["settings"])
    model = None
    if files.model.exists():
        frame = generate_ModelFrame(settings, device=torch.device(device), block_copies=False)
        frame.center_model.load_state_dict(torch.load(files.model, map_location=device, weights_only=True))
        model = frame.center_model
    try:
        checkpoint = files.checkpointer().latest(files.run)[0]
    except CheckpointError:
        checkpoint = None
    return RunRecord(files.run, settings, config, read_status(files.paths.reports, files.run),
                     read_metrics(files.paths.metrics(files.run)), model, checkpoint, files)


def units_text(H: dict[str, Any]) -> tuple[str, str]:
    """The text of the run's units file and where it comes from: the recorded text of ``--settings_file``
    (unless ``--units_file`` names another file), else the units file."""
    if H["settings_file"]:
        config = read_config(Path(H["settings_file"]))
        if "units_text" in config and H["units_file"] == config["settings"].get("units_file"):
            if not isinstance(config["units_text"], str):
                raise ConfigError(f"--settings_file {H['settings_file']!r}: units_text must be text, got "
                                  f"{config['units_text']!r}")
            return config["units_text"], f"{H['settings_file']} (recorded units)"
    path = H["units_file"] or DEFAULT_UNITS_FILE
    return read_units_text(path), str(path)


def measure_saved_model(run_or_path: str | Path, output_root: str | Path | None, units: str,
                        source: str) -> tuple[Frame, list[Path]]:
    """Run the plugins listed in ``units`` once on a run's saved model; each appends to its log of that run.

    Returns:
        The frame measured (its ``round`` is the run's last) and each unit's log file.

    Raises:
        ConfigError: no such run, no saved model, or a unit that cannot measure this model.
    """
    record = load_run(run_or_path, output_root)
    if record.model is None:
        raise ConfigError(f"--measure_only {run_or_path}: run {record.run_id} has no saved model "
                          f"{str(record.files.model)!r} (only finished or stopped runs save one)")
    frame = generate_ModelFrame(record.settings, units=parse_units(units, source), paths=record.files.paths,
                                block_copies=False)
    frame.center_model.load_state_dict(record.model.state_dict())
    frame.run, frame.round = record.run_id, record.history[-1]["round"] if record.history else 0
    logs = []
    for unit in frame.measure_units:
        try:
            unit.prepare(frame)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        frame.paths.measurements.mkdir(parents=True, exist_ok=True)
        log = frame.paths.measurements / f"{type(unit).__name__}_{record.run_id}.jsonl"
        unit.log_path, unit.count = log, len(log.read_text().splitlines()) if log.exists() else 0
        unit.log_measurement(frame, {**unit.measure(frame), "measure_only": True})
        logs.append(log)
    return frame, logs


def resume_notes(frame: Frame, resume: dict[str, Any] | None, previous: dict[str, Any] | None,
                 record: Mapping[str, Any]) -> list[str]:
    """The report lines of a resume: where it resumed from, what was skipped, and a thread-count warning."""
    if resume is None:
        return []
    notes = [f"Resumed at round {frame.round} from {resume['_path']}"
             + "".join(f"; skipped {problem}" for problem in resume["_problems"])]
    threads = (previous or {}).get("reproducibility", {}).get("torch_threads")
    if threads is not None and threads != record["torch_threads"]:
        notes.append(f"Warning: resumed with {record['torch_threads']} torch threads where the run had {threads}: "
                     f"the rest of the trajectory is not bit-identical to an uninterrupted run")
    return notes



def settings_defaults(argv: Sequence[str], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults``, or the settings of ``--settings_file`` when argv names one (flags given still override them),
    type-checked like the command line.

    Raises:
        ConfigError: the file is not a run config, has keys ``defaults`` lacks, or values of the wrong type.
    """
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--settings_file=")), None)
    if path is None and "--settings_file" in argv[:-1]:
        path = argv[list(argv).index("--settings_file") + 1]
    if not path:
        return dict(defaults)
    settings = read_config(Path(path))["settings"]
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ConfigError(f"--settings_file {path!r} has keys this dol1.py does not know: {unknown}")
    try:
        settings = {k: check_value(k, defaults[k], v) for k, v in settings.items()}
    except ConfigError as err:
        raise ConfigError(f"--settings_file {path!r}: {err}") from err
    return {**defaults, **settings, "settings_file": path, "resume": "no", "measure_only": ""}


def draw_training_curve(frame: Frame) -> None:
    """The training curve; a figure that cannot be written is a warning in the report, not a failed run."""
    figure = frame.paths.figures / f"training_curve_{frame.run_id}"
    try:
        drawn = training_curve(frame.history, figure,
                               title=f"{frame.run_id}: {frame.H['training_mode']}, {frame.H['model']}",
                               x=frame.H.get("plot_x", "samples"))
    except OSError as err:
        frame.log(f"Warning: the training curve could not be written to {figure}.pdf: {err}")
        return
    frame.log(f"Training curve: {figure}.pdf" if drawn else "No training curve: the engine logged no progress "
              "(engines log through training_loop or log_progress)")
