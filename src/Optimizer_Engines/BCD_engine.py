"""Training engines: plain functions that take a Frame and train it.

Data-order contract (shared by every engine, the multi-process one included): mini-batches come from one seeded
sequence ``frame.train_batches``; step t of entire mode uses batch t; local step t of round r uses batch r·K + t,
the same batch for every block. Consequences (tested): a one-block model trains identically in block-wise and
entire modes, and Jacobi with K = 1 and all blocks active equals entire training with an elementwise optimiser.

Block updates:
* ``jacobi`` (the seed's algorithm): every active block starts from the round's centre, takes K local steps, and
  all are gathered together at the end of the round. With large K this can diverge (each block over-fits to
  stale values of the others); damping ``gamma`` < 1 (centre <- centre + gamma·(update − centre)) is the usual cure.
* ``gauss_seidel``: blocks take turns; each starts from the latest centre and is gathered right after its steps.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from src.Buliding_Units.Model_frames import Disributed_frame, Frame

BLOCK_UPDATES = ("gauss_seidel", "jacobi")


# --------------------------------------------------------------------------------------------------------------------
# Pieces shared with the multi-process engine
# --------------------------------------------------------------------------------------------------------------------
def active_blocks(round_index: int, n_blocks: int, share: float, seed: int) -> list[int]:
    """The blocks updated in a round: all for share = 1, else a seeded random subset of ceil(share·B) blocks.

    A pure function of its arguments, so every worker of the multi-process engine picks the same subset.
    """
    if share >= 1.0:
        return list(range(n_blocks))
    count = max(1, math.ceil(share * n_blocks))
    rng = np.random.default_rng([seed, round_index])
    return sorted(rng.choice(n_blocks, size=count, replace=False).tolist())


def round_batches(frame: Frame, round_index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The K mini-batches of a round: batches r·K … r·K + K − 1 of the seeded sequence."""
    K = frame.H["K"]
    return [frame.train_batches[round_index * K + t] for t in range(K)]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_steps(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """K optimiser steps on one block's copy.

    Only the block's own parameters require grad in its copy, so autograd records nothing before the block (the
    prefix runs without a graph) and computes no weight gradients for the other blocks.
    """
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()


def blockwise_round(frame: Disributed_frame, round_index: int) -> float:
    """One round of the sequential block-wise algorithm; returns the deviation measured before the gather."""
    H = frame.H
    blocks = active_blocks(round_index, frame.n_blocks, H["active_share"], H["seed"])
    batches = round_batches(frame, round_index)
    if H["block_update"] == "gauss_seidel":
        dev = 0.0
        for b in blocks:
            t0 = time.perf_counter()
            frame.scatter(to=[b])  # start from the latest centre
            local_steps(frame.distributed_models[b], frame.block_optimizers[b], frame.criterion, batches)
            sync(frame.device)
            t1 = time.perf_counter()
            dev = math.hypot(dev, frame.deviation([b]))
            frame.gather_block(b)
            frame.timers["compute"] += t1 - t0
            frame.timers["communication"] += time.perf_counter() - t1
        if H.get("communication_delay", 0):
            time.sleep(H["communication_delay"])
            frame.timers["communication"] += H["communication_delay"]
    else:
        t0 = time.perf_counter()
        for b in blocks:
            local_steps(frame.distributed_models[b], frame.block_optimizers[b], frame.criterion, batches)
        sync(frame.device)
        t1 = time.perf_counter()
        dev = frame.communicate(blocks)
        sync(frame.device)
        frame.timers["compute"] += t1 - t0
        frame.timers["communication"] += time.perf_counter() - t1
    frame.steps += len(blocks) * H["K"]
    frame.samples += sum(len(y) for _, y in batches)
    return dev


# --------------------------------------------------------------------------------------------------------------------
# Progress, measurements, stoppers
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(frame: Frame, split: str) -> dict[str, float]:
    """Loss (and accuracy for classification) of the centre model on a split, in eval mode."""
    model, total, loss_sum, correct = frame.center_model, 0, 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for x, y in frame.data.eval_batches(split, frame.H["eval_samples"]):
            out = model(x)
            loss_sum += frame.criterion(out, y).item() * len(y)
            if frame.task == "classification":
                correct += (out.argmax(dim=1) == y).sum().item()
            total += len(y)
    finally:
        model.train(was_training)
    result = {"loss": loss_sum / max(total, 1)}
    if frame.task == "classification":
        result["accuracy"] = correct / max(total, 1)
    return result


def format_progress(m: dict[str, Any]) -> str:
    """The report's readable progress line (the seed's, extended)."""
    parts = [f"Energy = {m['loss']:.4g}"]
    if "accuracy" in m:
        parts.append(f"Accuracy = {m['accuracy']:.4f}")
    parts.append(f"Test Loss = {m['test_loss']:.4g}")
    if "test_accuracy" in m:
        parts.append(f"Test Accuracy = {m['test_accuracy']:.4f}")
    parts += [f"Steps = {m['steps']}", f"Samples = {m['samples']}", f"Time = {m['wall_time']:.2f}",
              f"ComputeTimeShare = {m['compute_time_share']:.2f}", f"Deviation = {m['deviation']:.4g}"]
    return f"Round {m['round']}: " + ", ".join(parts)


def log_progress(frame: Frame, deviation: float = 0.0) -> dict[str, Any]:
    """Evaluate on the big training batch and the test split, record and report; returns the metrics record."""
    t0 = time.perf_counter()
    train, test = evaluate(frame, "train"), evaluate(frame, "test")
    busy = frame.timers["compute"] + frame.timers["communication"]
    record: dict[str, Any] = {
        "round": frame.round, "steps": frame.steps, "samples": frame.samples,
        "wall_time": time.perf_counter() - frame.start_time, **train,
        **{f"test_{k}": v for k, v in test.items()},
        "compute_time": frame.timers["compute"], "communication_time": frame.timers["communication"],
        "compute_time_share": frame.timers["compute"] / busy if busy else 1.0,
        "deviation": deviation, "bytes_sent": frame.bytes_sent, "rounds_total": frame.H["rounds"],
    }
    frame.history.append(record)
    if frame.reporter is not None:
        frame.reporter.log(format_progress(record))
        frame.reporter.log_metrics(record)
    frame.timers["logging"] += time.perf_counter() - t0
    return record


def run_measurements(frame: Frame) -> None:
    """Run every measurement unit once and let it log its result."""
    t0 = time.perf_counter()
    for unit in frame.measure_units:
        result = unit.measure(frame)
        unit.log_measurement(frame, result)
    frame.timers["measurement"] += time.perf_counter() - t0


def check_stoppers(frame: Frame, record: dict[str, Any]) -> bool:
    """Ask every stopper about the latest progress record; the first that fires sets ``frame.stop_reason``."""
    for unit in frame.stopper_units:
        if unit.check(record):
            frame.stop_reason = f"{type(unit).__name__}: {unit.message}"
            frame.log(f"Stopping: {frame.stop_reason}")
            return True
    return False


def due(round_index: int, rate: int) -> bool:
    """True every ``rate`` rounds (rate 1 = every round, 0 = never)."""
    return rate > 0 and round_index % rate == 0


def training_loop(frame: Frame, step: Callable[[Frame, int], float],
                  progress: Callable[[int, int], None] | None = None) -> Frame:
    """Run ``step(frame, r)`` for every round, logging every ``report_sampling_rate`` rounds and measuring every
    ``measurement_sampling_rate`` rounds, both once more at the end; stoppers are asked after each progress check.
    """
    H = frame.H
    frame.start_time = time.perf_counter() - frame.history[-1]["wall_time"] if frame.history else time.perf_counter()
    frame.center_model.train()
    deviation = 0.0
    record = log_progress(frame) if frame.round == 0 else None
    stopped = record is not None and check_stoppers(frame, record)
    while not stopped and frame.round < H["rounds"]:
        deviation = step(frame, frame.round)
        frame.round += 1
        record = None
        if due(frame.round, H["report_sampling_rate"]):
            record = log_progress(frame, deviation)
            stopped = check_stoppers(frame, record)
        if due(frame.round, H["measurement_sampling_rate"]) and frame.round < H["rounds"] and not stopped:
            run_measurements(frame)
        if progress is not None:
            progress(frame.round, H["rounds"])
    if record is None or record["round"] != frame.round:
        stopped = check_stoppers(frame, log_progress(frame, deviation)) or stopped
    if H["measurement_sampling_rate"] > 0:
        run_measurements(frame)
    return frame


# --------------------------------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------------------------------
def entire_step(frame: Frame, round_index: int) -> float:
    """One optimiser step of the whole model on batch ``round_index``."""
    t0 = time.perf_counter()
    x, y = frame.train_batches[round_index]
    frame.optimizer.zero_grad(set_to_none=True)
    frame.criterion(frame.center_model(x), y).backward()
    frame.optimizer.step()
    sync(frame.device)
    frame.timers["compute"] += time.perf_counter() - t0
    frame.steps += 1
    frame.samples += len(y)
    return 0.0


def train_entire(frame: Frame, progress: Callable[[int, int], None] | None = None) -> Frame:
    """Vanilla training of the centre model: one round = one optimiser step."""
    return training_loop(frame, entire_step, progress)


def train_blockwise_sequential(frame: Disributed_frame,
                               progress: Callable[[int, int], None] | None = None) -> Frame:
    """Block-wise training in one process: each round, every active block takes K local steps on its own copy
    (Jacobi: all from the round's centre; Gauss–Seidel: from the latest centre), then the communication stage."""
    if not isinstance(frame, Disributed_frame):
        raise TypeError(f"train_blockwise_sequential needs a Disributed_frame, got {type(frame).__name__}")
    for replica in frame.distributed_models.values():
        replica.train()
    return training_loop(frame, blockwise_round, progress)


def train_blockwise_distributed(frame: Disributed_frame,
                                progress: Callable[[int, int], None] | None = None) -> Frame:
    """One worker process per block on torch.distributed (see ``distributed_engine.py``)."""
    from src.Optimizer_Engines.distributed_engine import run_distributed
    return run_distributed(frame, progress)


ENGINES: dict[str, Callable[..., Frame]] = {
    "blockwise": train_blockwise_distributed,
    "blockwise_sequential": train_blockwise_sequential,
    "entire": train_entire,
}
