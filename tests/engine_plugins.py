"""Engines defined outside src/, for the engine-table tests: one plain function, one registered with the decorator.

dol1.py puts the project root on sys.path, so ``--training_mode tests.engine_plugins.train_two_phase`` imports this.
"""
from __future__ import annotations

from src.Optimizer_Engines import register_engine
from src.Optimizer_Engines.BCD_engine import blockwise_round, entire_step
from src.Optimizer_Engines.loop import training_loop


def train_plain(frame):
    """A user's engine that takes only a Frame: plain whole-model steps, tagged so a test can tell it ran."""
    frame.H["_engine_ran"] = "train_plain"  # visible to the test through the returned frame
    return training_loop(frame, entire_step)


@register_engine("test_block_sweeps", block_copies=True, block_updates=("jacobi", "gauss_seidel"))
def train_two_sweeps(frame, progress=None):
    """Two block-wise passes per round (a decorated engine outside the package)."""
    def step(frame, round_index):
        blockwise_round(frame, 2 * round_index)
        return blockwise_round(frame, 2 * round_index + 1)
    return training_loop(frame, step, progress)
