"""Reopening a run: ``load_run`` (settings, status, history, the saved model, the latest checkpoint) and
``--measure_only`` (the measurement units once on a run's saved model)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.Buliding_Units.Model_frames import Frame, RunContext, generate_ModelFrame
from src.Buliding_Units.plugins import parse_units
from src.cli import ConfigError
from src.reporting import Paths, read_metrics, read_status
from src.Runs.checkpoint import CheckpointError, Checkpointer
from src.Runs.resume import read_config


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
    paths: Paths


def _locate(run_or_path: str | Path, output_root: str | Path | None) -> tuple[Paths, str]:
    text = str(run_or_path)
    path = Path(text)
    if path.suffix or os.sep in text:  # a file of the run: R<hash>.txt, .config.json, .model.pt, …
        return Paths(path.resolve().parent.parent), path.name.split(".")[0]
    return Paths.for_output_root(output_root), text


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
    paths, run = _locate(run_or_path, output_root)
    config = read_config(paths.config(run))
    settings = dict(config["settings"])
    model = None
    if paths.model(run).exists():
        frame = generate_ModelFrame(settings, device=torch.device(device), block_copies=False)
        frame.center_model.load_state_dict(torch.load(paths.model(run), map_location=device, weights_only=True))
        model = frame.center_model
    try:
        checkpoint = Checkpointer(paths.checkpoints(run)).latest(run)[0]
    except CheckpointError:
        checkpoint = None
    return RunRecord(run, settings, config, read_status(paths.reports, run), read_metrics(paths.metrics(run)), model,
                     checkpoint, paths)


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
                          f"{str(record.paths.model(record.run_id))!r} (only finished or stopped runs save one)")
    frame = generate_ModelFrame(record.settings, units=parse_units(units, source), block_copies=False,
                                run=RunContext(record.run_id, record.paths))
    frame.center_model.load_state_dict(record.model.state_dict())
    frame.round = record.history[-1]["round"] if record.history else 0
    logs = []
    for unit in frame.measure_units:
        try:
            unit.prepare(frame)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        frame.paths.measurements.mkdir(parents=True, exist_ok=True)
        log = frame.paths.measurements / f"{type(unit).__name__}_{record.run_id}.jsonl"
        unit.log_path, unit.count = log, len(log.read_text().splitlines()) if log.exists() else 0
        unit.figure_suffix = "_measure_only"  # its figures beside the training's, not over them
        unit.log_measurement(frame, {**unit.measure(frame), "measure_only": True})
        logs.append(log)
    return frame, logs
