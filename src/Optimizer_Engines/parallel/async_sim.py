"""The exact simulator of asynchronous block updates (``--training_mode async_sequential``), in one process.

Event-driven in virtual time. Worker w (owning blocks ``assign_blocks``) reads the centre, computes its update (K
local steps per owned block, for real, on its block copies) and schedules the write at ``now + duration``::

    duration_w = K * len(blocks_w) * worker_speeds[w] * step_time + link(centre) + link(blocks_w)   (virtual seconds)

where link(n bytes) = link_latency + n / link_bandwidth is the simulated network's time of one message (the centre
to the worker, its blocks back to the server).

Writes are applied in virtual-time order; writes at the same virtual time in an order drawn from a generator
seeded with ``--seed`` (the draw is made when the write is scheduled). After each write every idle worker that the
staleness bound lets start reads the centre at that moment (see ``async_book``). Every read, write and staleness is
therefore exact and deterministic: the same settings give the same trajectory, bit for bit, on any machine — with
``--step_time`` given; ``--step_time 0`` measures it (wall seconds per local step of the first update), which only
changes the schedule when the link takes time.

Rounds: a round ends once B more block updates (B = blocks) have been applied, so ``rounds`` budgets compare with
the synchronous engines; learning-rate and other schedules change at round boundaries, and the reads released by
a round's last write happen after them. Updates still in flight when the run ends are dropped (counted in
``updates_in_flight`` of the last record; the report says how many). With ``--max_staleness 0`` every update of round r reads the centre after all updates of
round r-1: the Jacobi engine, bit for bit. The link's time is virtual here (no sleep).
"""
from __future__ import annotations

import heapq
import math
import random
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from src.blocks import block_bytes
from src.Buliding_Units.Model_frames import Disributed_frame, Frame, link_seconds
from src.Optimizer_Engines.parallel.async_book import StalenessBook, assign_blocks, check_speeds
from src.plots import pyplot, save_figure
from src.Optimizer_Engines.loop import (EngineState, RoundBatches, attach_engine, count_step, local_steps, sync,
                                        training_loop)


def check_async(frame: Frame) -> None:
    """The asynchronous engines' checks on a built frame (before anything is written).

    Raises:
        ValueError: a worker_speeds list that does not fit the workers, active_share < 1, or a schedule of
            active_share.
    """
    H = frame.H
    check_speeds(H["worker_speeds"], len(assign_blocks(frame.n_blocks, H["n_workers"])))
    if H["active_share"] < 1:
        raise ValueError(f"--active_share {H['active_share']}: the asynchronous engines update every block (each "
                         f"worker at its own pace); use --active_share 1")
    for unit in frame.schedule_units:
        if getattr(unit, "key", None) == "active_share":
            raise ValueError("a ParameterSchedule of active_share cannot run in an asynchronous engine (every "
                             "block is always updated)")


def squared_deviation(block: torch.nn.Module, centre: torch.nn.Module) -> list[float]:
    """The terms of ``Frame.deviation``'s sum for one block (one per parameter tensor): summed in the same order,
    they give the synchronous engine's deviation bit for bit."""
    with torch.no_grad():
        return [(mine - theirs).double().pow(2).sum().item()
                for mine, theirs in zip(block.parameters(), centre.parameters())]


def round_deviation(terms: list[tuple[int, list[float]]]) -> float:
    """The round's deviation from its writes' (block, terms): summed in block order, as ``Frame.deviation``."""
    total = 0.0
    for _, block_terms in sorted(terms, key=lambda item: item[0]):
        for term in block_terms:
            total += term
    return math.sqrt(total)


def measure_step_time(frame: Disributed_frame, repeats: int = 3) -> float:
    """Wall seconds of one local step (forward and backward of block 0's copy on batch 0, no optimiser step):
    the median of ``repeats`` after one warm-up. The RNG is restored, so measuring changes no trajectory."""
    model = frame.distributed_models[min(frame.distributed_models)]
    x, y = frame.train_batches[0]
    rng = torch.get_rng_state()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        frame.criterion(model(x), y).backward()
        sync(frame.device)
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    return sorted(times[1:])[len(times[1:]) // 2]


def _pair(value: Fraction) -> list[int]:
    """An exact virtual time as [numerator, denominator] (checkpoints hold plain containers)."""
    return [value.numerator, value.denominator]


class Simulator(EngineState):
    """The simulator's state; ``step`` is one round of :func:`training_loop`."""

    def __init__(self, frame: Disributed_frame) -> None:
        H = frame.H
        self.frame = frame
        self.blocks_of = assign_blocks(frame.n_blocks, H["n_workers"])
        self.speeds = check_speeds(H["worker_speeds"], len(self.blocks_of))
        self.book = StalenessBook(len(self.blocks_of), H["max_staleness"], self.blocks_of)
        self.clock, self.step_time = Fraction(0), float(H["step_time"])
        self.cursor = [0] * len(self.blocks_of)  # next batch index of each worker
        self.events: list[list[Any]] = []  # [time, tie-break draw, worker, K] of every update in flight
        self.ties = random.Random(H["seed"])
        self.round_dev: list[tuple[int, list[float]]] = []  # (block, squared-deviation terms) of the round's writes

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.ties.getstate()
        return {"book": self.book.state_dict(), "clock": _pair(self.clock), "step_time": self.step_time,
                "cursor": list(self.cursor), "events": [[_pair(t), d, w, k] for t, d, w, k in self.events],
                "ties": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.book = StalenessBook.from_state(state["book"])
        self.clock, self.step_time = Fraction(*state["clock"]), state["step_time"]
        self.cursor = list(state["cursor"])
        self.events = [[Fraction(*t), d, w, k] for t, d, w, k in state["events"]]
        version, internal, gauss = state["ties"]
        self.ties.setstate((version, tuple(internal), gauss))

    def metrics(self) -> dict[str, Any]:
        return {"virtual_time": float(self.clock), "step_time": self.step_time, **self.book.record()}

    def _duration(self, w: int, K: int) -> Fraction:
        """Virtual seconds of an update of worker w, in exact rational arithmetic: equal durations are equal and
        ties are decided by the seeded draw only, never by the rounding of a running float sum. An update is two
        messages on the link model (the centre to the worker, its blocks back), counted when they happen."""
        frame = self.frame
        push = sum(block_bytes(frame.center_model.blocks[b]) for b in self.blocks_of[w])
        return K * len(self.blocks_of[w]) * Fraction(self.speeds[w]) * Fraction(self.step_time) + \
            Fraction(link_seconds(frame.H, block_bytes(frame.center_model))) + Fraction(link_seconds(frame.H, push))

    def _start(self, starters: list[int]) -> None:
        """The workers ``starters`` read the centre now (all the same centre), compute their updates — block by
        block in block order, as the Jacobi engine does — and schedule their writes."""
        frame, K = self.frame, self.frame.H["K"]
        work = []
        for w in starters:
            self.book.on_read(w)
            frame.send(w, block_bytes(frame.center_model))  # the centre, to the worker
            frame.scatter(to=self.blocks_of[w])  # each copy of w's blocks now holds the centre as read
            batches = RoundBatches(frame.train_batches, self.cursor[w], K)
            self.cursor[w] += K
            work += [(b, batches) for b in self.blocks_of[w]]
        t0 = time.perf_counter()
        for b, batches in sorted(work, key=lambda item: item[0]):
            local_steps(frame.distributed_models[b], frame.block_optimizers[b], frame.criterion, batches)
        sync(frame.device)
        frame.timers["compute"] += time.perf_counter() - t0
        for w in starters:
            heapq.heappush(self.events, [self.clock + self._duration(w, K), self.ties.random(), w, K])

    def _write(self, w: int, K: int) -> None:
        frame = self.frame
        frame.send(w, sum(block_bytes(frame.center_model.blocks[b]) for b in self.blocks_of[w]))  # w's blocks back
        for b in self.blocks_of[w]:
            self.round_dev.append((b, squared_deviation(frame.distributed_models[b].blocks[b],
                                                        frame.center_model.blocks[b])))
            frame.gather_block(b)
        self.book.on_write(w)
        blocks = len(self.blocks_of[w])
        count_step(frame, frame.train_batches.batch_size, blocks, steps=K * blocks)

    def _serve(self) -> None:
        starters = [w for w in range(self.book.n) if self.book.may_start(w)]
        if starters:
            self._start(starters)

    def step(self, frame: Frame, round_index: int) -> float:
        """Apply writes in virtual-time order until the round's B block updates are in; returns the deviation."""
        target = (round_index + 1) * frame.n_blocks
        self.round_dev = []
        if self.step_time <= 0:
            self.step_time = measure_step_time(frame)
        self._serve()
        while self.book.block_updates < target:
            if not self.events:
                raise RuntimeError(f"no update in flight and none may start: {self.book.record()}")
            when, _, w, K = heapq.heappop(self.events)
            self.clock = when
            self._write(w, K)
            if self.book.block_updates < target:
                self._serve()
        count_step(frame, 0, 0, steps=0, new_samples=frame.H["K"] * frame.train_batches.batch_size)
        return round_deviation(self.round_dev)

    def finish(self) -> None:
        """Drop the updates still in flight (their writes lie after the end of the run)."""
        for w in self.book.in_flight():
            self.book.on_drop(w)
        self.events = []


def train_async_sequential(frame: Disributed_frame, progress: Callable[[int, int], None] | None = None) -> Frame:
    """Asynchronous block updates simulated exactly in virtual time (one process; bound --max_staleness)."""
    if not isinstance(frame, Disributed_frame):
        raise TypeError(f"train_async_sequential needs a Disributed_frame, got {type(frame).__name__}")
    check_async(frame)
    simulator = Simulator(frame)
    for replica in frame.distributed_models.values():
        replica.train()
    attach_engine(frame, simulator)
    try:
        training_loop(frame, simulator.step, progress)
    finally:
        attach_engine(frame, None)
    simulator.finish()
    draw_staleness(frame)
    frame.log(async_summary(simulator.book, frame.n_blocks) + f"; virtual time {float(simulator.clock):.4g} s "
              f"(step_time {simulator.step_time:.3g} s)")
    return frame


def async_summary(book: StalenessBook, n_blocks: int) -> str:
    """One report line: updates per block, staleness and the bound."""
    record = book.record()
    bound = "unbounded" if book.bound < 0 else f"max_staleness {book.bound}"
    return (f"Asynchronous updates ({bound}, {book.n} workers): updates per block {record['updates_per_block']}, "
            f"staleness mean {record['staleness_mean']:.3g} max {record['staleness_max']}, "
            f"histogram {record['staleness_histogram']}, {book.dropped} dropped at the end")


def staleness_histogram(histogram: Sequence[int], path: str | Path, title: str = "") -> list[Path]:
    """Bars of how many updates saw each staleness (other updates applied between read and write)."""
    plt = pyplot()
    counts = np.asarray(histogram, dtype=float)
    fig, ax = plt.subplots(figsize=(6.0, 3.6), layout="constrained")
    ax.bar(np.arange(len(counts)), counts, color="tab:blue")
    ax.set_xlabel("staleness (updates by other workers between an update's read and its write)")
    ax.set_ylabel("updates")
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def draw_staleness(frame: Frame) -> None:
    """The run's staleness histogram, ``figures/staleness_<run id>.{pdf,png}``; a figure that cannot be written is a
    warning in the report."""
    last = frame.history[-1] if frame.history else {}
    if "staleness_histogram" not in last:
        return
    figure = frame.paths.figures / f"staleness_{frame.run_id}"
    bound = "unbounded" if last["max_staleness"] < 0 else f"max_staleness {last['max_staleness']}"
    try:
        staleness_histogram(last["staleness_histogram"], figure, title=f"{frame.run_id}: {frame.H['training_mode']}"
                            f", {bound}, {sum(last['staleness_histogram'])} updates")
        frame.log(f"Staleness histogram: {figure}.pdf")
    except OSError as err:
        frame.log(f"Warning: the staleness histogram could not be written to {figure}.pdf: {err}")
