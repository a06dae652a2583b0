"""Resuming a run: its recorded settings, the checkpoint to continue from, and what the report says about it.

A run resumes (``--resume yes|auto|<run id>``) from the newest checkpoint under ``checkpoints/R<hash>/`` that
verifies; ``--settings_file`` runs an earlier run's recorded experiment again. Both read ``R<hash>.config.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from src.Buliding_Units.Model_frames import Frame
from src.cli import ConfigError, check_value
from src.records import RESUME_MODES, differing_keys, identity
from src.reporting import Paths, read_status
from src.Runs.checkpoint import CheckpointError, Checkpointer, restore


def read_config(path: Path) -> dict[str, Any]:
    """A run's config file (``R<hash>.config.json``).

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


def _similar_runs(paths: Paths, run: str, H: Mapping[str, Any], units_text: str) -> list[tuple[str, list[str]]]:
    """Runs of the same output root that have checkpoints, with the experiment keys in which they differ."""
    found = []
    for folder in sorted((paths.root / "checkpoints").glob("R*")):
        config = paths.config(folder.name)
        if folder.name == run or not config.exists() or not any(folder.glob("round_*.pt")):
            continue
        other = read_config(config)
        keys = differing_keys(identity(other["settings"], other.get("units_text", "")), identity(H, units_text))
        found.append((folder.name, keys))
    return sorted(found, key=lambda item: len(item[1]))


def find_resume(paths: Paths, run: str, mode: str, H: Mapping[str, Any], units_text: str) -> dict[str, Any] | None:
    """The checkpoint payload to resume from (None = start fresh), for ``--resume mode``.

    Raises:
        ConfigError: ``yes`` (or a run id) without a usable checkpoint; a run id whose settings differ (the keys
            are named).
    """
    if mode == "no":
        return None
    state = read_status(paths.reports, run) or {}
    if state.get("status") in ("finished", "stopped"):
        if mode == "auto":
            return None  # nothing left to resume: a fresh run (the finished one is archived)
        raise ConfigError(f"--resume: run {run} has {state['status']} already; nothing to resume "
                          f"(report: {str(paths.report(run))!r})")
    if mode not in ("yes", "auto"):  # a run id: its settings must be these
        if not paths.config(mode).exists():
            raise ConfigError(f"--resume {mode}: no run config {str(paths.config(mode))!r}; valid: "
                              f"{list(RESUME_MODES)} or the id of a run with a config in {str(paths.reports)!r}")
        config = read_config(paths.config(mode))
        keys = differing_keys(identity(config["settings"], config.get("units_text", "")), identity(H, units_text))
        if keys:
            raise ConfigError(f"--resume {mode}: refused, these experiment settings differ from that run's: {keys} "
                              f"(run it again with the same settings, or start a new run without --resume)")
    try:
        payload, path, problems = Checkpointer(paths.checkpoints(run)).latest(run)
    except CheckpointError as err:
        if mode == "auto":
            return None
        similar = [f"{other} differs in {keys}" for other, keys in _similar_runs(paths, run, H, units_text)[:3]]
        raise ConfigError(f"--resume: nothing to resume for run {run}: {err}"
                          + (f"; runs with checkpoints here: {'; '.join(similar)}" if similar else "")) from err
    payload["_path"], payload["_problems"] = str(path), problems
    return payload


def restore_run(frame: Frame, payload: dict[str, Any]) -> None:
    """Put the freshly built frame in the checkpoint's state.

    Raises:
        ConfigError: the checkpoint verifies but does not fit this frame.
    """
    try:
        restore(frame, payload)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"--resume: the checkpoint {payload['_path']} does not fit this run: {err}") from err


def resume_notes(frame: Frame, payload: dict[str, Any], record: Mapping[str, Any]) -> list[str]:
    """The report lines of a resume: where it resumed from, what was skipped, and a thread-count warning."""
    notes = [f"Resumed at round {frame.round} from {payload['_path']}"
             + "".join(f"; skipped {problem}" for problem in payload["_problems"])]
    config = frame.paths.config(frame.run_id)
    previous = read_config(config) if config.exists() else {}
    threads = previous.get("reproducibility", {}).get("torch_threads")
    if threads is not None and threads != record["torch_threads"]:
        notes.append(f"Warning: resumed with {record['torch_threads']} torch threads where the run had {threads}: "
                     f"the rest of the trajectory is not bit-identical to an uninterrupted run")
    return notes


def settings_file_path(argv: Sequence[str]) -> str | None:
    """The value of ``--settings_file`` in ``argv``, if given."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--settings_file=")), None)
    if path is None and "--settings_file" in argv[:-1]:
        path = argv[list(argv).index("--settings_file") + 1]
    return path or None


def settings_defaults(argv: Sequence[str], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``--settings_file`` over ``defaults`` (flags given still override them), type-checked like
    the command line; ``defaults`` when argv names no file.

    Raises:
        ConfigError: the file is not a run config, has keys ``defaults`` lacks, or values of the wrong type.
    """
    path = settings_file_path(argv)
    if path is None:
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


def recorded_units(H: Mapping[str, Any]) -> tuple[str, str] | None:
    """The units text ``--settings_file`` recorded (unless ``--units_file`` names another file), and its source."""
    config = read_config(Path(H["settings_file"]))
    if "units_text" in config and H["units_file"] == config["settings"].get("units_file"):
        if not isinstance(config["units_text"], str):
            raise ConfigError(f"--settings_file {H['settings_file']!r}: units_text must be text, got "
                              f"{config['units_text']!r}")
        return config["units_text"], f"{H['settings_file']} (recorded units)"
    return None
