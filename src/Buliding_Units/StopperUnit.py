"""Stopper plugins: decide, at each progress check, whether a run should end.

A stopper sees the metrics record of one progress check (keys such as ``loss``, ``accuracy``, ``test_loss``,
``test_accuracy``) and returns True to stop; it then holds a machine-readable ``reason`` and a ``message``.
Order of checks follows Lightning's ``EarlyStopping``: non-finite, threshold, improvement, patience. Patience is
counted in progress checks, not rounds. Stoppers are configured from ``dol1.py`` keys or from ``Units.txt`` lines
such as ``- EarlyStoppingStopper monitor=test_loss patience=5``.
"""
from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from typing import Any, Mapping

from src.cli import ConfigError

MONITORS = ("loss", "accuracy", "test_loss", "test_accuracy")


def _resolve_mode(monitor: str, mode: str) -> str:
    if monitor not in MONITORS:
        raise ValueError(f"unknown monitor {monitor!r}; valid: {sorted(MONITORS)}")
    if mode == "auto":
        return "max" if monitor.endswith("accuracy") else "min"
    if mode not in ("min", "max"):
        raise ValueError(f"unknown mode {mode!r}; valid: ['auto', 'max', 'min']")
    return mode


class StopperUnit(ABC):
    """Base class of stoppers: ``check(metrics)`` returns True when the run should stop.

    After a True return, ``reason`` is a short machine-readable tag and ``message`` a sentence for the report.
    Stoppers never touch the model; they cost nothing.
    """

    plugin_kind = "stopper"  # how the frame factory files it: measure_units, stopper_units or schedule_units

    # class-level defaults, so a subclass whose __init__ does not call super().__init__() still works
    reason: str | None = None
    message: str | None = None

    @abstractmethod
    def check(self, metrics: Mapping[str, Any]) -> bool:
        """Look at one progress check's metrics; True means stop."""

    def check_round(self, frame: Any) -> bool:
        """Asked after every round (not only at progress checks); True means stop. Default: never."""
        return False

    def _stop(self, reason: str, message: str) -> bool:
        self.reason, self.message = reason, message
        return True

    def state_dict(self) -> dict[str, Any]:
        """The stopper's mutable state, for resumed runs."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        vars(self).update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    def config(self) -> dict[str, Any]:
        """The constructor arguments, for the report."""
        return {}


class NonFiniteStopper(StopperUnit):
    """Stops as soon as the training loss (or any monitored loss) is NaN or infinite. Always installed."""

    def __init__(self, monitors: tuple[str, ...] = ("loss", "test_loss")) -> None:
        self.monitors = tuple(monitors)

    def check(self, metrics: Mapping[str, Any]) -> bool:
        for key in self.monitors:
            value = metrics.get(key)
            if value is not None and not math.isfinite(value):
                return self._stop("non_finite", f"{key} is {value} at round {metrics.get('round')}")
        return False


class EarlyStoppingStopper(StopperUnit):
    """Patience-based early stopping on a loss or an accuracy, train or test.

    Args:
        monitor: one of ``loss``, ``accuracy``, ``test_loss``, ``test_accuracy``.
        patience: number of progress checks without improvement after which the run stops (>= 1).
        min_delta: an improvement must exceed this (a change equal to ``min_delta`` is no improvement).
        mode: ``min``, ``max`` or ``auto`` (max for accuracies, min for losses).
        divergence_threshold: stop at once when the metric is worse than this (None: off).
    """

    def __init__(self, monitor: str = "test_loss", patience: int = 10, min_delta: float = 0.0, mode: str = "auto",
                 divergence_threshold: float | None = None) -> None:
        self.mode = _resolve_mode(monitor, mode)
        if int(patience) != patience or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.monitor, self.patience, self.min_delta = monitor, int(patience), float(min_delta)
        self.divergence_threshold = divergence_threshold
        self.best: float | None = None
        self.wait = 0

    def config(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "patience": self.patience, "min_delta": self.min_delta, "mode": self.mode,
                "divergence_threshold": self.divergence_threshold}

    def _better(self, value: float, reference: float, delta: float) -> bool:
        return value < reference - delta if self.mode == "min" else value > reference + delta

    def check(self, metrics: Mapping[str, Any]) -> bool:
        if self.monitor not in metrics:
            raise KeyError(f"{type(self).__name__} monitors {self.monitor!r}, which this run does not report; "
                           f"available: {sorted(k for k in metrics if k in MONITORS)}")
        value = float(metrics[self.monitor])
        if not math.isfinite(value):
            return self._stop("non_finite", f"{self.monitor} is {value}")
        if self.divergence_threshold is not None and self._better(self.divergence_threshold, value, 0.0):
            return self._stop("divergence", f"{self.monitor} = {value:.6g} is worse than the divergence threshold "
                                            f"{self.divergence_threshold}")
        if self.best is None or self._better(value, self.best, self.min_delta):
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        if self.wait >= self.patience:
            return self._stop("patience", f"{self.monitor} did not improve by more than {self.min_delta} for "
                                          f"{self.wait} checks (best {self.best:.6g})")
        return False


class TargetStopper(StopperUnit):
    """Threshold stopping: stop once the monitored metric is strictly better than ``threshold``.

    Args:
        monitor: one of ``loss``, ``accuracy``, ``test_loss``, ``test_accuracy``.
        threshold: the target (for accuracies: stop when above it; for losses: when below it).
        mode: ``min``, ``max`` or ``auto``.
    """

    def __init__(self, monitor: str = "test_accuracy", threshold: float = 0.99, mode: str = "auto") -> None:
        self.mode = _resolve_mode(monitor, mode)
        self.monitor, self.threshold = monitor, float(threshold)

    def config(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "threshold": self.threshold, "mode": self.mode}

    def check(self, metrics: Mapping[str, Any]) -> bool:
        if self.monitor not in metrics:
            raise KeyError(f"{type(self).__name__} monitors {self.monitor!r}, which this run does not report; "
                           f"available: {sorted(k for k in metrics if k in MONITORS)}")
        value = float(metrics[self.monitor])
        reached = value < self.threshold if self.mode == "min" else value > self.threshold
        if reached:
            return self._stop("target", f"{self.monitor} = {value:.6g} reached the target {self.threshold}")
        return False


class BudgetStopper(StopperUnit):
    """Stops once a compute budget is spent: ``samples`` (training samples), ``steps`` (optimiser steps) or
    ``seconds`` (wall time of training), whichever is named (several: the first reached; none: it never stops).
    Checked after every round, so two runs compared at one budget stop within one round of it. Cost: nothing."""

    def __init__(self, samples: int | None = None, steps: int | None = None, seconds: float | None = None) -> None:
        budgets = {"samples": samples, "steps": steps, "seconds": seconds}
        for key, value in budgets.items():
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0
                                      or not math.isfinite(value)):
                raise ValueError(f"{key} must be a positive number, got {value!r}")
        self.budgets = {k: v for k, v in budgets.items() if v is not None}

    def config(self) -> dict[str, Any]:
        return dict(self.budgets)

    def _spent(self, used: Mapping[str, float]) -> bool:
        for key, budget in self.budgets.items():
            if used.get(key, 0) >= budget:
                return self._stop(f"budget_{key}", f"{key} budget {budget:g} reached ({used[key]:g} used)")
        return False

    def check(self, metrics: Mapping[str, Any]) -> bool:
        return self._spent({"samples": metrics.get("samples", 0), "steps": metrics.get("steps", 0),
                            "seconds": metrics.get("wall_time", 0.0)})

    def check_round(self, frame: Any) -> bool:
        return self._spent({"samples": frame.samples, "steps": frame.steps,
                            "seconds": time.perf_counter() - frame.run.start_time})


def stoppers_from_settings(H: Mapping[str, Any]) -> list[StopperUnit]:
    """The stoppers asked for by ``dol1.py``'s keys; the non-finite check is always first.

    Raises:
        ConfigError: a monitor, patience or delta the stoppers reject.
    """
    units: list[StopperUnit] = [NonFiniteStopper()]
    for key in ("early_stop_monitor", "target_monitor"):  # checked even when the stopper is off: a typo shows
        if H[key] not in MONITORS:
            raise ConfigError(f"--{key} {H[key]!r} is not valid; valid: {sorted(MONITORS)}")
    try:
        if H["early_stop_patience"] > 0:
            units.append(EarlyStoppingStopper(H["early_stop_monitor"], H["early_stop_patience"],
                                              H["early_stop_min_delta"]))
        if H["target_value"] is not None:
            units.append(TargetStopper(H["target_monitor"], H["target_value"]))
    except ValueError as err:
        raise ConfigError(f"stopper settings: {err}") from err
    return units
