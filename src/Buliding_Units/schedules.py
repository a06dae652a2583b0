"""Applying schedules to a run: every schedule's changes for a round, merged and applied to a frame (settings,
optimiser learning rates, a curriculum's pool), and the values a progress record carries. The schedules themselves
are in ``ScheduleUnit.py``, imported only when a units file names one.
"""
from __future__ import annotations

import math
from typing import Any

from src.Data import PoolBatchStream

KEYS = {"K": (int, 1, None), "active_share": (float, 0.0, 1.0), "gamma": (float, 0.0, 1.0)}  # type, (low, high]


class ScheduleError(ValueError):
    """A schedule gives a value the run cannot use (a learning rate <= 0, K < 1, a share outside (0, 1]): before
    training it is bad input (exit 2); found while training (ReduceLROnPlateau) it stops the run with the reason."""


def check_schedules(units: list[Any]) -> None:
    """Refuse two schedules of one value (the later would silently override the earlier).

    Raises:
        ValueError: naming the value and the schedules.
    """
    seen: dict[str, Any] = {}
    for unit in units:
        key = getattr(unit, "controls", None)
        if key is not None and key in seen:
            raise ValueError(f"two schedules set {key}: {seen[key]!r} and {unit!r}; keep one")
        if key is not None:
            seen[key] = unit


def schedule_changes(frame: Any, round_index: int) -> dict[str, Any]:
    """Every schedule's changes for the round, merged (a later schedule wins on the same key).

    Raises:
        ScheduleError: a value the run cannot use (learning rates finite and > 0; K, active_share, gamma in range).
    """
    changes: dict[str, Any] = {}
    for unit in frame.schedule_units:
        changes.update(unit.at(frame, round_index))
    for lr in changes.get("lr", []):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ScheduleError(f"the learning rate at round {round_index} would be {lr!r}; it must be finite and > 0")
    for key, (kind, low, high) in KEYS.items():
        value = changes.get(key)
        if value is not None and not (isinstance(value, kind) and (value >= low if kind is int else value > low)
                                      and (high is None or value <= high)):
            raise ScheduleError(f"{key} at round {round_index} would be {value!r}; valid: "
                                f"{'>= ' + str(low) if kind is int else f'in ({low}, {high}]'}")
    return changes


def apply_changes(frame: Any, changes: dict[str, Any]) -> None:
    """Apply a round's changes to this process's frame: settings, optimiser learning rates, the curriculum pool."""
    for key in KEYS:
        if key in changes:
            frame.H[key] = changes[key]
    if "lr" in changes:
        frame.current_lrs = list(changes["lr"])
        optimizers = [(0, frame.optimizer)] if frame.optimizer is not None else []
        for b, optimizer in optimizers + list(getattr(frame, "block_optimizers", {}).items()):
            for group in optimizer.param_groups:
                group["lr"] = frame.current_lrs[b]
    if "order" in changes:
        frame.pool_order, frame.pool_size = changes["order"], None
    size = changes.get("pool_size")
    if size is not None and size != frame.pool_size:
        inputs, targets = frame.data.train.tensors
        # each pool size has its own seeded order of its samples
        frame.train_batches = PoolBatchStream(inputs, targets, frame.pool_order[:size], frame.H_initial["batch_size"],
                                              frame.H["seed"] + POOL_SEED_STRIDE * size)
        frame.pool_size = size


POOL_SEED_STRIDE = 7_919  # the batch order of a pool of m samples is seeded with seed + POOL_SEED_STRIDE * m


def schedule_record(frame: Any) -> dict[str, Any]:
    """The schedule-driven values for a progress record: lr (first block's; per block in block-wise modes), K,
    active_share, gamma, and the pool size when a curriculum is active."""
    record: dict[str, Any] = {"lr": frame.current_lrs[0], "K": frame.H["K"], "active_share": frame.H["active_share"],
                              "gamma": frame.H["gamma"]}
    if hasattr(frame, "distributed_models"):
        record["lr_blocks"] = list(frame.current_lrs)
    if frame.pool_size is not None:
        record["pool_size"] = frame.pool_size
    return record
