"""The loop every engine shares: rounds, progress checks, measurements, stoppers, and the block-local pieces.

An engine supplies ``step(frame, round_index) -> deviation`` and calls :func:`training_loop`, which logs every
``report_sampling_rate`` rounds, measures on the schedule of ``measurement_sampling_rate`` and ``measurement_rounds``
(see ``measurement_schedule``; both once more at the end) and asks the stoppers after each progress check.

Data-order contract (shared by every engine, the multi-process one included): mini-batches come from one seeded
sequence ``frame.train_batches``; step t of entire mode uses batch t; local step t of round r uses batch r·K + t,
the same batch for every block. Consequences (tested): a one-block model trains identically in block-wise and
entire modes, and Jacobi with K = 1 and all blocks active equals entire training with an elementwise optimiser.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from src.Buliding_Units.measurement_schedule import measurement_due, measuring
from src.Buliding_Units.Model_frames import Frame
from src.Buliding_Units.schedules import ScheduleError, apply_changes, schedule_changes, schedule_record
from src.reporting import format_progress


class EngineState:
    """The hook of an engine that keeps state beyond the frame: set ``frame.engine`` with :func:`attach_engine`.

    Override what applies: ``state_dict()`` is saved in every checkpoint and ``load_state_dict(state)`` gets it back
    on resume; ``metrics()`` adds fields to every progress record; a multi-process engine's ``ranks_state()`` returns
    the other ranks' block copies, optimisers and RNG (``{"copies", "block_optimizers", "rng"}``) for a checkpoint,
    and ``ranks_memory()`` every rank's memory figures for the memory unit.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s result."""

    def metrics(self) -> dict[str, Any]:
        return {}

    def ranks_state(self) -> dict[str, Any] | None:
        return None

    def ranks_memory(self) -> list[dict[str, Any]] | None:
        return None


def attach_engine(frame: Frame, engine: EngineState | None) -> None:
    """Set (or with None, clear) ``frame.engine``; a resumed run hands the engine the state it saved."""
    frame.engine = engine
    saved = frame.run.resumed.get("engine")
    if engine is not None and saved is not None:
        engine.load_state_dict(saved)


BLOCK_ORDERS = ("cyclic", "reverse", "random")


def active_blocks(round_index: int, n_blocks: int, share: float, seed: int, order: str = "cyclic") -> list[int]:
    """The blocks updated in a round, in the order they are visited (Gauss–Seidel takes them in this order).

    ``ceil(share·B)`` blocks: ``cyclic`` continues through 0, 1, …, B−1, 0, … from round to round (all blocks in
    ascending order at share 1; one block per round at share 1/B, BAdam's ascending order); ``reverse`` the same
    descending; ``random`` a seeded draw re-drawn each round, visited in a seeded random order. A pure function of
    its arguments, so every worker of a multi-process engine and a resumed run pick the same blocks.
    """
    count = max(1, min(n_blocks, math.ceil(share * n_blocks)))
    if order == "random":
        rng = np.random.default_rng([seed, round_index])
        return rng.choice(n_blocks, size=count, replace=False).tolist() if count < n_blocks else \
            rng.permutation(n_blocks).tolist()
    cyclic = [(round_index * count + i) % n_blocks for i in range(count)] if count < n_blocks else \
        list(range(n_blocks))
    return cyclic if order == "cyclic" else [n_blocks - 1 - b for b in cyclic]


ROUND_CACHE_BYTES = 64 * 2**20  # a round keeps the batches it fetched up to this size; beyond, it fetches again


class RoundBatches(Sequence):
    """The K mini-batches of a round, batches start … start + K − 1 of the seeded sequence, fetched when used.

    Memory does not grow with K: fetched batches are kept for the other blocks of the round only while they fit
    in ``ROUND_CACHE_BYTES``; past that each use fetches again (the batch is a pure function of its index).
    """

    def __init__(self, stream: Any, start: int, K: int):
        self.stream, self.start, self.K = stream, start, K
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return self.K

    def __getitem__(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= t < self.K:
            raise IndexError(f"local step {t} of a round with K = {self.K}")
        if t in self._cache:
            return self._cache[t]
        batch = self.stream[self.start + t]
        size = sum(x.numel() * x.element_size() for x in batch)
        if self._cached_bytes + size <= ROUND_CACHE_BYTES:
            self._cache[t], self._cached_bytes = batch, self._cached_bytes + size
        return batch

    @property
    def samples(self) -> int:
        """Training samples in the round's K batches (every batch of the sequence is full)."""
        return self.K * self.stream.batch_size


def round_batches(frame: Frame, round_index: int) -> RoundBatches:
    """The K mini-batches of the round: the next K batches of the seeded sequence (r·K … r·K + K − 1 while K is
    fixed; a schedule that changes K moves the start by the K of each round), fetched when used. Call it once per
    round: it advances ``frame.batch_cursor``."""
    batches = RoundBatches(frame.train_batches, frame.batch_cursor, frame.H["K"])
    frame.batch_cursor += frame.H["K"]
    return batches


def count_step(frame: Frame, samples: int, block_updates: int, *, steps: int = 1, new_samples: int = 0) -> None:
    """Count training compute the same way in every engine; call it wherever optimiser steps are taken.

    Adds ``steps`` optimiser steps, each on a mini-batch of ``samples`` samples that went through one forward and
    one backward pass of the model, and ``block_updates`` block updates of the centre model: one block's new values
    entering the centre (an entire-model step updates all ``frame.n_blocks``; a block's K local steps, gathered
    once, are one). A block-local step still runs the forward through the whole model, so it costs a full forward
    pass of its samples; its backward stops at the block's first layer but is counted as one backward pass.
    ``new_samples`` (default 0) is added to ``frame.samples``, the training samples drawn from the data: Jacobi
    blocks that share a round's batches count those samples once.

    Example: entire training, ``count_step(frame, len(y), frame.n_blocks, new_samples=len(y))`` per step; a
    block-wise round over active ``blocks``,
    ``count_step(frame, batch_size, len(blocks), steps=len(blocks) * K, new_samples=K * batch_size)``.
    """
    frame.steps += steps
    frame.block_updates += block_updates
    frame.forward_sample_passes += steps * samples
    frame.backward_sample_passes += steps * samples
    frame.samples += new_samples


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_steps(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """K optimiser steps on one block's copy.

    Only the block's own parameters require grad in its copy, so autograd records nothing before the block (the
    prefix runs without a graph) and computes no weight gradients for the other blocks.
    """
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()


ACCURACY_TASKS = ("classification", "language_model")  # tasks whose records carry an accuracy


@torch.no_grad()
def evaluate(frame: Frame, split: str) -> dict[str, float]:
    """Loss (and accuracy for classification and language models) of the centre model on a split, in eval mode.

    The loss is the mean over samples (a language model's per-sample loss is already the mean over its characters,
    so this is the mean over all characters); accuracy counts ``out.argmax(-1) == y`` over every target element
    (one per sample for classification, every next character for a language model). A language model also gets
    ``bits_per_char`` = loss / ln 2.
    """
    model, total, loss_sum, correct, targets = frame.center_model, 0, 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        chunk = 1024  # samples; a sequence's attention costs its length squared, so fewer long ones at a time
        if frame.task == "language_model":
            chunk = max(1, 1024 * 64 * 64 // int(frame.H.get("context", 64)) ** 2)
        for x, y in frame.data.eval_batches(split, frame.H["eval_samples"], chunk):
            out = model(x)
            loss_sum += frame.criterion(out, y).item() * len(y)
            if frame.task in ACCURACY_TASKS:
                correct += (out.argmax(dim=-1) == y).sum().item()
                targets += y.numel()
            total += len(y)
    finally:
        model.train(was_training)
    result = {"loss": loss_sum / max(total, 1)}
    if frame.task in ACCURACY_TASKS:
        result["accuracy"] = correct / max(targets, 1)
    if frame.task == "language_model":
        result["bits_per_char"] = result["loss"] / math.log(2)
    return result


def log_progress(frame: Frame, deviation: float = 0.0) -> dict[str, Any]:
    """Evaluate on the big training batch and the test split, record and report; returns the metrics record."""
    t0 = time.perf_counter()
    train, test = evaluate(frame, "train"), evaluate(frame, "test")
    busy = frame.timers["compute"] + frame.timers["communication"]
    record: dict[str, Any] = {
        "round": frame.round, **asdict(frame.counters),
        "wall_time": time.perf_counter() - frame.run.start_time, "train_time": busy,
        "measure_time": frame.timers["measurement"], "eval_time": frame.timers["logging"], **train,
        **{f"test_{k}": v for k, v in test.items()},
        "compute_time": frame.timers["compute"], "communication_time": frame.timers["communication"],
        "compute_time_share": frame.timers["compute"] / busy if busy else 1.0,
        "deviation": deviation, "rounds_total": frame.H["rounds"],
        **schedule_record(frame), **(frame.engine.metrics() if frame.engine is not None else {}),
    }
    if frame.H.get("targets"):
        record["targets_met"] = targets_met(frame, record)
    frame.history.append(record)
    if frame.run.reporter is not None:
        frame.run.reporter.log(format_progress(record))
        frame.run.reporter.log_metrics(record)
    frame.timers["logging"] += time.perf_counter() - t0
    return record


TARGET_METRICS = ("loss", "accuracy", "test_loss", "test_accuracy")
TARGET_AT = ("round", "samples", "steps", "train_time", "wall_time", "virtual_time")  # what a target records of the
# check that met it (virtual_time: the asynchronous simulator's clock, in its records only)


def targets_met(frame: Frame, record: dict[str, Any]) -> dict[str, Any]:
    """The ``--targets`` met so far: metric -> the first progress check at which it was reached (accuracies at or
    above their target, losses at or below), carried on from the previous record (so a resumed run keeps them)."""
    met = dict(frame.history[-1].get("targets_met", {})) if frame.history else {}
    for metric, goal in frame.H["targets"].items():
        value = record.get(metric)
        if metric in met or not isinstance(value, float) or not math.isfinite(value):
            continue
        if (value >= goal) if metric.endswith("accuracy") else (value <= goal):
            met[metric] = {"target": goal, "value": value, **{k: record[k] for k in TARGET_AT if k in record}}
            frame.log(f"Target {metric} {'>=' if metric.endswith('accuracy') else '<='} {goal} reached at round "
                      f"{record['round']} ({record['samples']} samples, {record['train_time']:.3g} s training)")
    return met


def model_is_finite(frame: Frame) -> bool:
    """Whether every parameter and buffer of the centre and the last logged losses are finite."""
    last = frame.history[-1] if frame.history else {}
    losses = [v for k, v in last.items() if k.endswith("loss") and isinstance(v, float)]
    with torch.no_grad():
        tensors = all(torch.isfinite(t).all() for t in frame.center_model.state_dict().values()
                      if t.is_floating_point())
    return tensors and all(math.isfinite(v) for v in losses)


def run_measurements(frame: Frame) -> None:
    """Run every measurement unit once and let it log its result; skipped (and said so) on a diverged model,
    whose curvature would be logged as finite-looking numbers of a meaningless model."""
    if frame.measure_units and not model_is_finite(frame):
        frame.log(f"Measurements skipped at round {frame.round}: the model has non-finite parameters or losses")
        return
    t0 = time.perf_counter()
    for unit in frame.measure_units:
        result = unit.measure(frame)
        unit.log_measurement(frame, result)
    frame.timers["measurement"] += time.perf_counter() - t0


def finish_measurements(frame: Frame) -> None:
    """Let every unit finish its run-wide output after the last measurement (e.g. redraw figures on one scale)."""
    t0 = time.perf_counter()
    for unit in frame.measure_units:
        unit.finish(frame)
    frame.timers["measurement"] += time.perf_counter() - t0


def check_stoppers(frame: Frame, record: dict[str, Any]) -> bool:
    """Ask every stopper about the latest progress record; the first that fires sets ``frame.stop_reason``."""
    for unit in frame.stopper_units:
        if unit.check(record):
            frame.stop_reason = f"{type(unit).__name__}: {unit.message}"
            frame.stop_kind = unit.reason
            frame.log(f"Stopping: {frame.stop_reason}")
            return True
    return False


def save_checkpoint(frame: Frame) -> None:
    """Write a checkpoint of the round just completed, counted in the ``checkpoint`` timer."""
    t0 = time.perf_counter()
    path = frame.run.checkpointer.save(frame)
    frame.run.checkpointed_round = frame.round
    frame.timers["checkpoint"] = frame.timers.get("checkpoint", 0.0) + time.perf_counter() - t0
    frame.log(f"Checkpoint at round {frame.round}: {path}")


def check_round_stoppers(frame: Frame) -> bool:
    """Ask the stoppers that watch every round (budgets); the first that fires sets ``frame.stop_reason``."""
    for unit in frame.stopper_units:
        if unit.check_round(frame):
            frame.stop_reason, frame.stop_kind = f"{type(unit).__name__}: {unit.message}", unit.reason
            frame.log(f"Stopping: {frame.stop_reason}")
            return True
    return False


def due(round_index: int, rate: int) -> bool:
    """True every ``rate`` rounds (rate 1 = every round, 0 = never)."""
    return rate > 0 and round_index % rate == 0


def training_loop(frame: Frame, step: Callable[[Frame, int], float],
                  progress: Callable[[int, int], None] | None = None) -> Frame:
    """Run ``step(frame, r)`` for every round, logging every ``report_sampling_rate`` rounds and measuring on the
    measurement schedule, both once more at the end; stoppers are asked after each progress check.
    """
    H = frame.H
    frame.run.start_time = time.perf_counter() - frame.run.elapsed  # elapsed > 0 after a resume
    frame.center_model.train()
    deviation = 0.0
    first = schedule_changes(frame, 0) if frame.round == 0 else None  # the first record shows round 0's settings
    if first is not None:
        apply_changes(frame, first)
    record = log_progress(frame) if frame.round == 0 else None
    stopped = record is not None and check_stoppers(frame, record)
    for unit in frame.schedule_units if record is not None else ():
        unit.observe(frame, record)
    if record is not None and not stopped and H["rounds"] > 0 and measurement_due(0, H):
        run_measurements(frame)  # round 0: the model before training
    while not stopped and frame.round < H["rounds"]:
        t0 = time.perf_counter()
        try:
            frame.round_changes = first if first is not None and frame.round == 0 else \
                schedule_changes(frame, frame.round)  # a multi-process engine sends them on to every rank
        except ScheduleError as err:  # a value that turned bad while training: stop, do not train with it
            frame.stop_reason, frame.stop_kind = f"schedule: {err}", "schedule"
            frame.log(f"Stopping: {frame.stop_reason}")
            break
        apply_changes(frame, frame.round_changes)
        frame.timers["schedules"] = frame.timers.get("schedules", 0.0) + time.perf_counter() - t0
        deviation = step(frame, frame.round)
        frame.round += 1
        stopped = check_round_stoppers(frame)
        record = None
        if due(frame.round, H["report_sampling_rate"]) or stopped:
            record = log_progress(frame, deviation)
            stopped = check_stoppers(frame, record) or stopped
            for unit in frame.schedule_units:
                unit.observe(frame, record)
        if measurement_due(frame.round, H) and frame.round < H["rounds"] and not stopped:
            run_measurements(frame)
        if progress is not None:
            progress(frame.round, H["rounds"])
        if frame.run.checkpointer is not None and not stopped and (frame.run.interrupt is not None or (
                due(frame.round, H.get("checkpoint_every", 0)) and frame.round < H["rounds"])):
            save_checkpoint(frame)  # an interrupted run checkpoints even its last round: nothing trained is lost
        if frame.run.interrupt is not None:
            raise KeyboardInterrupt(f"signal {frame.run.interrupt}")
    if record is None or record["round"] != frame.round:
        stopped = check_stoppers(frame, log_progress(frame, deviation)) or stopped
    if measuring(H):
        run_measurements(frame)
        finish_measurements(frame)
    return frame
