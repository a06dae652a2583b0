"""A float64 ``entire`` engine for tests/test_ddp.py (used only in subprocesses, so the test session's engine table
stays as it is): the frame's model is cast to float64 on every rank before training, so a data-parallel run and a
single process can be compared to 1e-10.

Named on the command line as ``--training_mode tests.ddp_helpers.train_entire_float64``.
"""
from __future__ import annotations

from src.Optimizer_Engines import engine_options
from src.Optimizer_Engines.BCD_engine import train_entire
from src.Optimizer_Engines.parallel.ddp_engine import ddp_worker


def to_float64(frame):
    """The model's parameters and buffers in float64, and its floating-point inputs cast on the way in."""
    frame.center_model.double()
    frame.center_model.register_forward_pre_hook(
        lambda module, args: tuple(a.double() if a.is_floating_point() else a for a in args))
    return frame


def worker_float64(H):
    ddp_worker(H, prepare=to_float64)


@engine_options(torchrun_worker=worker_float64)
def train_entire_float64(frame, progress=None):
    """Entire training in float64 (data parallel under torchrun), for the tests."""
    return train_entire(to_float64(frame), progress)
