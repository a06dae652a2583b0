"""TensorBoard event files of a run (``--tensorboard true``; off by default).

The logger reads what the run records anyway, so no engine or plugin knows about it: it wraps the script's
``progress(done, total)`` callback and, after every round, writes what is new since the last call:

* every progress record of ``frame.history`` as scalars ``progress/<key>`` at step = round (losses, accuracies,
  steps, samples, bytes_sent, timers, deviation), and the schedules' values of the same record as
  ``schedule/<key>`` (``lr``, ``K``, ``active_share``, ``gamma``, ``pool_size``; ``lr_blocks/<b>`` per block);
* every new record of a measurement unit's log (``unit.log_path``) at step = its round: numbers (nested ones too)
  as ``measurements/<Unit>/<key>``, the coupling matrix C_ij (i < j) as ``coupling/<Unit>/<i>_<j>``, and the PNG
  heat-maps the unit wrote as images ``heatmaps/<Unit>/<figure>``;
* at the end, the hyper-parameters with the final metrics (the HParams tab's summaries, as ``add_hparams`` writes
  them, but into the run's own folder, not a time-stamped sub-folder) so that the runs of a sweep compare there.

Event files go to ``<output root>/tensorboard/<run id>/``; ``tensorboard --logdir <output root>/tensorboard``
shows every run of that output root. A fresh attempt moves an earlier folder of the same run id aside
(``<run id>.<n>``); a resumed run appends, and TensorBoard hides the interrupted attempt's events after the
checkpoint (``purge_step``).

Nothing here imports TensorBoard at import time: :class:`TensorBoardLog` imports ``torch.utils.tensorboard``, and
``dol1.py`` imports this module only when the run asks for it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from src.cli import ConfigError

SCHEDULE_KEYS = ("lr", "lr_blocks", "K", "active_share", "gamma", "pool_size")  # see schedules.schedule_record
SKIPPED_KEYS = ("round", "rounds_total")  # the step itself, and a constant
FINAL_METRICS = ("loss", "accuracy", "test_loss", "test_accuracy", "steps", "samples", "bytes_sent", "wall_time")


def tensorboard_dir(root: Path, run: str) -> Path:
    """Where run ``run`` writes its event files under the output root ``root``."""
    return Path(root) / "tensorboard" / run


def numbers(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    """The finite numbers in ``value`` as (tag, number): a dict's by key, a flat list's by index, joined with '/'.

    Booleans, strings, None, non-finite numbers and lists of lists are left out (a matrix is not a scalar series).
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            yield prefix, float(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from numbers(f"{prefix}/{key}", item)
    elif isinstance(value, (list, tuple)) and not any(isinstance(v, (list, tuple, Mapping)) for v in value):
        for index, item in enumerate(value):
            yield from numbers(f"{prefix}/{index}", item)


def progress_scalars(record: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """The scalars of one progress record: ``schedule/<key>`` for the schedules' values, ``progress/<key>`` else."""
    for key, value in record.items():
        if key not in SKIPPED_KEYS:
            yield from numbers(f"{'schedule' if key in SCHEDULE_KEYS else 'progress'}/{key}", value)


def measurement_scalars(unit: str, record: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """The scalars of one measurement record: its numbers, and the coupling matrix's upper triangle."""
    for key, value in record.items():
        if key == "coupling" and isinstance(value, list):
            for i, row in enumerate(value):
                for j in range(i + 1, len(row)):
                    yield from numbers(f"coupling/{unit}/{i}_{j}", row[j])
        elif key not in ("round", "figures"):
            yield from numbers(f"measurements/{unit}/{key}", value)


def hparam_value(value: Any) -> bool | int | float | str:
    """A setting as the HParams tab takes it: numbers, booleans and strings as they are, anything else as text."""
    if isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _archive(folder: Path) -> None:
    """Move an earlier attempt's folder aside as ``<run id>.<n>`` (first free n)."""
    if not folder.exists():
        return
    n = 1
    while folder.with_name(f"{folder.name}.{n}").exists():
        n += 1
    folder.rename(folder.with_name(f"{folder.name}.{n}"))


class TensorBoardLog:
    """The run's progress callback, plus its TensorBoard event files (see the module docstring).

    Args:
        frame: the run's frame, with its reporter (rank 0 of a multi-process run).
        progress: the callback to wrap, or None.
    """

    def __init__(self, frame: Any, progress: Callable[[int, int], None] | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # only when asked for: it imports tensorboard
        except ImportError as err:
            raise ConfigError("--tensorboard true needs the tensorboard package: python -m pip install "
                              "tensorboard (see requirements.txt)") from err
        self.frame, self.progress = frame, progress
        self.folder = tensorboard_dir(frame.paths.root, frame.run_id)
        resumed = frame.round > 0 and self.folder.exists()  # the earlier attempt logged up to its checkpoint
        if not resumed:
            _archive(self.folder)
        self.writer = SummaryWriter(str(self.folder), purge_step=frame.round + 1 if resumed else None)
        self.seen = len(frame.history) if resumed else 0
        self.seen_lines = {id(u): self._lines(u) if resumed else 0 for u in frame.measure_units}
        self.closed = False

    @staticmethod
    def _lines(unit: Any) -> int:
        path = getattr(unit, "log_path", None)
        return len(path.read_text().splitlines()) if path is not None and path.exists() else 0

    def __call__(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)
        self.write_new()

    def write_new(self) -> None:
        """Write the progress and measurement records that appeared since the last call."""
        wrote = False
        for record in self.frame.history[self.seen:]:
            for tag, value in progress_scalars(record):
                self.writer.add_scalar(tag, value, record["round"])
            wrote = True
        self.seen = len(self.frame.history)
        for unit in self.frame.measure_units:
            wrote = self._write_unit(unit) or wrote
        if wrote:
            self.writer.flush()  # a run that fails later keeps what it logged

    def _write_unit(self, unit: Any) -> bool:
        path, name = getattr(unit, "log_path", None), type(unit).__name__
        if path is None or not path.exists():
            return False
        lines = path.read_text().splitlines()
        new = [json.loads(line) for line in lines[self.seen_lines[id(unit)]:] if line.strip()]
        self.seen_lines[id(unit)] = len(lines)
        for record in new:
            step = int(record.get("round", self.frame.round))
            for tag, value in measurement_scalars(name, record):
                self.writer.add_scalar(tag, value, step)
            for figure in record.get("figures") or ():
                if str(figure).endswith(".png") and Path(figure).exists():
                    self._image(f"heatmaps/{name}/{Path(figure).stem.rsplit('_', 1)[0]}", Path(figure), step)
        return bool(new)

    def _image(self, tag: str, png: Path, step: int) -> None:
        from matplotlib.image import imread  # matplotlib draws the figures anyway
        self.writer.add_image(tag, imread(str(png))[..., :3], step, dataformats="HWC")  # (H, W, RGB) in [0, 1]

    def write_hparams(self) -> None:
        """The settings with the final metrics, for the HParams tab (metric tags ``final/<metric>``)."""
        from torch.utils.tensorboard.summary import hparams
        last = self.frame.history[-1] if self.frame.history else {}
        metrics = {f"final/{key}": float(last[key]) for key in FINAL_METRICS
                   if isinstance(last.get(key), (int, float)) and math.isfinite(last[key])}
        settings = {key: hparam_value(value) for key, value in sorted(self.frame.H.items())}
        settings["run_id"] = self.frame.run_id
        writer = self.writer._get_file_writer()
        for summary in hparams(settings, metrics):
            writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, self.frame.round)

    def close(self) -> None:
        """Close the wrapped callback, write what is new and the hyper-parameters, close the event file."""
        if self.closed:
            return
        self.closed = True
        if self.progress is not None and hasattr(self.progress, "close"):
            self.progress.close()
        self.write_new()
        if self.frame.run.interrupt is None:  # an interrupted run is resumed later: its end is not the run's end
            self.write_hparams()
        self.writer.close()
