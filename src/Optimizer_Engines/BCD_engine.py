"""The single-process engines: entire training and block-wise training, with the block updates as a table.

Block updates (``--block_update``), each a function ``(frame, blocks, batches) -> deviation``:

* ``jacobi`` (the seed's algorithm): every active block starts from the round's centre, takes K local steps, and
  all are gathered together at the end of the round. With large K this can diverge (each block over-fits to
  stale values of the others): on digits, K = 50 fell to 0.3–0.7 training accuracy where Gauss–Seidel stayed near
  0.99. Damping ``gamma`` < 1 (centre <- centre + gamma·(update − centre)) is the usual cure of parallel block
  methods.
* ``gauss_seidel``: blocks take turns; each starts from the latest centre and is gathered right after its steps.

The data order and the loop are shared with every engine (see ``loop.py``).
"""
from __future__ import annotations

import math
import time
from typing import Callable

from src.blocks import block_bytes
from src.Buliding_Units.Model_frames import Disributed_frame, Frame
from src.Optimizer_Engines import ENGINES, load_path, torchrun_world
from src.Optimizer_Engines.loop import (RoundBatches, active_blocks, count_step, local_steps, round_batches, sync,
                                        training_loop)

Batches = RoundBatches


def jacobi_update(frame: Disributed_frame, blocks: list[int], batches: Batches) -> float:
    """Every block in ``blocks`` takes K local steps from the round's centre; then one communication stage."""
    t0 = time.perf_counter()
    for b in blocks:
        local_steps(frame.distributed_models[b], frame.block_optimizers[b], frame.criterion, batches)
    sync(frame.device)
    t1 = time.perf_counter()
    dev = frame.communicate(blocks)
    sync(frame.device)
    frame.timers["compute"] += t1 - t0
    frame.timers["communication"] += time.perf_counter() - t1
    return dev


def gauss_seidel_update(frame: Disributed_frame, blocks: list[int], batches: Batches) -> float:
    """Blocks take turns: each starts from the latest centre and is gathered right after its K local steps."""
    dev = 0.0
    for b in blocks:
        t0 = time.perf_counter()
        frame.scatter(to=[b])  # start from the latest centre
        local_steps(frame.distributed_models[b], frame.block_optimizers[b], frame.criterion, batches)
        sync(frame.device)
        t1 = time.perf_counter()
        dev = math.hypot(dev, frame.deviation([b]))
        frame.gather_block(b)
        link = frame.send(b, block_bytes(frame.center_model.blocks[b]), frame.n_blocks - 1)  # to every other block
        if link > 0:
            time.sleep(link)
        frame.timers["compute"] += t1 - t0
        frame.timers["communication"] += time.perf_counter() - t1
    return dev


BLOCK_UPDATES: dict[str, Callable[[Disributed_frame, list[int], Batches], float]] = {
    "gauss_seidel": gauss_seidel_update,
    "jacobi": jacobi_update,
}


def blockwise_round(frame: Disributed_frame, round_index: int) -> float:
    """One round of the sequential block-wise algorithm; returns the deviation measured before the gather."""
    H = frame.H
    blocks = active_blocks(round_index, frame.n_blocks, H["active_share"], H["seed"], H["block_order"])
    batches = round_batches(frame, round_index)
    dev = BLOCK_UPDATES[H["block_update"]](frame, blocks, batches)
    count_step(frame, batches.stream.batch_size, len(blocks), steps=len(blocks) * H["K"],
               new_samples=batches.samples)
    return dev


def entire_step(frame: Frame, round_index: int) -> float:
    """One optimiser step of the whole model on batch ``round_index``."""
    t0 = time.perf_counter()
    x, y = frame.train_batches[round_index]
    frame.optimizer.zero_grad(set_to_none=True)
    frame.criterion(frame.center_model(x), y).backward()
    frame.optimizer.step()
    sync(frame.device)
    frame.timers["compute"] += time.perf_counter() - t0
    count_step(frame, len(y), frame.n_blocks, new_samples=len(y))
    return 0.0


def train_entire(frame: Frame, progress: Callable[[int, int], None] | None = None) -> Frame:
    """Vanilla training of the whole model: one round = one optimiser step (data-parallel under torchrun with several
    ranks: the engine table names that engine, ``ENGINES["entire"].torchrun_path``)."""
    if torchrun_world() > 1:
        return load_path(ENGINES["entire"].torchrun_path)(frame, progress)
    return training_loop(frame, entire_step, progress)


def train_blockwise_sequential(frame: Disributed_frame,
                               progress: Callable[[int, int], None] | None = None) -> Frame:
    """Block-wise training in one process: K local steps per active block per round (Jacobi or Gauss-Seidel)."""
    if not isinstance(frame, Disributed_frame):
        raise TypeError(f"train_blockwise_sequential needs a Disributed_frame, got {type(frame).__name__}")
    for replica in frame.distributed_models.values():
        replica.train()
    return training_loop(frame, blockwise_round, progress)


def __getattr__(name: str):
    """The seed's third loop, ``train_blockwise_distributed``, lives in the parallel wing; imported on first use."""
    if name == "train_blockwise_distributed":
        return ENGINES["blockwise"].load().function
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
