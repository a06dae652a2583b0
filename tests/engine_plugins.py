"""Engines defined outside src/, for the engine-table tests: one plain function, one with its options attached by the decorator.

dol1.py puts the project root on sys.path, so ``--training_mode tests.engine_plugins.train_two_phase`` imports this.
"""
from __future__ import annotations

from src.Optimizer_Engines import engine_options
from src.Optimizer_Engines.BCD_engine import blockwise_round, entire_step
from src.Optimizer_Engines.loop import training_loop


def train_plain(frame):
    """A user's engine that takes only a Frame: plain whole-model steps, tagged so a test can tell it ran."""
    frame.H["_engine_ran"] = "train_plain"  # visible to the test through the returned frame
    return training_loop(frame, entire_step)


@engine_options(block_copies=True, block_updates=("jacobi", "gauss_seidel"))
def train_two_sweeps(frame, progress=None):
    """Two block-wise passes per round (a decorated engine outside the package)."""
    def step(frame, round_index):
        blockwise_round(frame, 2 * round_index)
        return blockwise_round(frame, 2 * round_index + 1)
    return training_loop(frame, step, progress)


def takes_nothing():
    """Not an engine: it cannot take a Frame."""


# The README's "Extending the framework" recipe, verbatim: a Jacobi round written from the loop's helpers.
from src.Optimizer_Engines.loop import active_blocks, count_step, local_steps, round_batches  # noqa: E402


@engine_options(block_copies=True)
def train_readme_jacobi(frame, progress=None):
    """The README's example engine: Jacobi rounds from the loop's helpers."""
    def step(frame, round_index):                         # one round; returns the deviation it measured
        blocks = active_blocks(round_index, frame.n_blocks, frame.H["active_share"], frame.H["seed"],
                               frame.H["block_order"])
        batches = round_batches(frame, round_index)       # batches r·K … r·K+K−1 of the seeded order
        for b in blocks:
            local_steps(frame.distributed_models[b], frame.block_optimizers[b], frame.criterion, batches)
        count_step(frame, batches.stream.batch_size, len(blocks),   # the counters every report logs
                   steps=len(blocks) * len(batches), new_samples=batches.samples)
        return frame.communicate(blocks)                  # deviation, damped gather, delay, scatter
    return training_loop(frame, step, progress)           # logging, measurements, stoppers, checkpoints


# A user's schedule whose values turn bad only while training: the loop must stop the run, not train with them.
from src.Buliding_Units.ScheduleUnit import ScheduleUnit  # noqa: E402


class TurnsNegative(ScheduleUnit):
    """Learning rate --step_size until round ``at``, then its negative."""

    def __init__(self, at: int = 5) -> None:
        self.turn = at

    def at(self, frame, round_index):
        sign = -1 if round_index >= self.turn else 1
        return {"lr": [sign * frame.H["step_size"]] * frame.n_blocks}


from src.Buliding_Units.MeasurementUnit import MeasurementUnit  # noqa: E402


class SlowUnit(MeasurementUnit):
    """A measurement that only takes time (``seconds``), to show what measuring does to the clocks."""

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def measure(self, frame):
        import time
        time.sleep(self.seconds)
        return {"slept": self.seconds}
