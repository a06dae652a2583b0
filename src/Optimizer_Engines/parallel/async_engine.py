"""The real asynchronous engine (``--training_mode async``): a parameter-server rank and one process per worker.

Rank 0 is the **server**: it holds the centre, runs :func:`training_loop` (reports, measurements, stoppers,
schedules, checkpoints) and owns no block. Ranks 1 … W are the **workers** (worker w = rank w + 1 owns blocks
``assign_blocks``). The semantics, the staleness bound and the data order are those of ``async_book`` and the
simulator ``async_sim``; this engine runs them for real, with real stragglers: a worker with speed k sleeps
(k − 1) × its measured step time after each local step.

Transport: ``torch.distributed`` point-to-point ``send``/``recv`` on **gloo**, with the payload on the CPU. The
server must serve workers in the order they finish, and gloo's ``recv`` without a source receives from any rank and
returns the sender (NCCL has no any-source receive; collectives would put a barrier back into every update; the RPC
framework adds a second runtime and thread pools for what two fixed-shape messages do). Every exchange has a fixed
shape, and the server never stops receiving while a worker may be sending:

* reply (server → worker): a header ``[command, first batch, K, number of schedule changes]``, then for ``GO`` the
  whole centre (one flat tensor per dtype), then the schedule changes since the worker's last read (objects);
* push (worker → server): a header ``[updates pushed so far, compute ns, wait ns, 0]``, then the worker's blocks
  (parameters and buffers, one flat tensor per dtype). The server checks the count: an update lost in transit ends
  the run.

A round ends once B block updates were applied; the reads a round's last write released are served after the next
round's schedule changes. A checkpoint is a barrier: the server stops serving reads, applies the updates in flight,
then every rank hands its state over (``distributed_state.gather_states``). At the end, updates in flight are
received and dropped (``updates_in_flight`` of the last record), and every worker gets ``STOP``. Failures are those of the synchronous
multi-process engine (``worker_pool``): a worker that raises or dies ends the run within seconds with its traceback.
With ``--max_staleness 0`` the engine computes the Jacobi algorithm, equal bit for bit to the sequential engine at
the same number of threads per process.

Test hook: the worker whose rank equals ``BLOCKWISE_TEST_FAIL_RANK`` raises at the start of its update number
``BLOCKWISE_TEST_FAIL_ROUND`` (default 1).
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from src.blocks import block_bytes, block_tensors
from src.Buliding_Units.Model_frames import Disributed_frame, Frame, generate_ModelFrame, link_seconds
from src.Buliding_Units.schedules import apply_changes
from src.Buliding_Units.schedules import KEYS
from src.Optimizer_Engines.parallel.async_book import StalenessBook
from src.Optimizer_Engines.parallel.async_sim import (async_summary, check_async, draw_staleness, round_deviation,
                                                     squared_deviation)
from src.Optimizer_Engines.parallel.async_transport import (AsyncPlan, header as _header, make_plan, prepare, recv_tensors,
                                                   send_tensors)
from src.Optimizer_Engines.parallel.distributed_state import gather_states, to_cpu
from src.Optimizer_Engines.loop import EngineState, RoundBatches, attach_engine, count_step, sync, training_loop
from src.Optimizer_Engines.parallel.worker_pool import WorkerPool, loopback_only
from src.Optimizer_Engines.parallel.worker_session import engine_processes
from src.Optimizer_Engines.parallel.worker_plan import torchrun_env

GO, STOP, CHECKPOINT = 1, -1, -2
FAIL_RANK_ENV, FAIL_ROUND_ENV = "BLOCKWISE_TEST_FAIL_RANK", "BLOCKWISE_TEST_FAIL_ROUND"


# --------------------------------------------------------------------------------------------------------------------
# A worker (rank >= 1)
# --------------------------------------------------------------------------------------------------------------------
def _local_steps(frame: Disributed_frame, blocks: tuple[int, ...], batches: RoundBatches, speed: float) -> float:
    """K local steps on each block; a straggler sleeps (speed − 1) × each step's time. Returns seconds spent."""
    t0 = time.perf_counter()
    for b in blocks:
        model, optimizer = frame.distributed_models[b], frame.block_optimizers[b]
        for x, y in batches:
            t = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            frame.criterion(model(x), y).backward()
            optimizer.step()
            sync(frame.device)
            if speed > 1:
                time.sleep((speed - 1) * (time.perf_counter() - t))
    return time.perf_counter() - t0


def worker_loop(frame: Disributed_frame, plan: AsyncPlan, rank: int) -> None:
    """Answer the server's replies until STOP: read, compute, push."""
    prepare(frame, plan, rank)
    blocks, speed, pushes = plan.blocks_of[rank - 1], plan.speeds[rank - 1], 0
    fail_at = int(os.environ.get(FAIL_ROUND_ENV, "1")) if os.environ.get(FAIL_RANK_ENV) == str(rank) else None
    while True:
        t0 = time.perf_counter()
        header = _header()
        dist.recv(header, src=0)
        command, start, K, n_changes = header.tolist()
        if command == STOP:
            return
        if command == CHECKPOINT:
            gather_states(frame, rank, plan.world)
            continue
        time.sleep(link_seconds(frame.H, recv_tensors(block_tensors(frame.center_model), src=0)))  # the link
        if n_changes:
            changes: list[Any] = [None] * n_changes
            dist.recv_object_list(changes, src=0)
            for change in changes:
                apply_changes(frame, change)
        waited = time.perf_counter() - t0
        if pushes == fail_at:
            raise RuntimeError(f"{FAIL_RANK_ENV} test hook: rank {rank} fails in its update {pushes}")
        frame.scatter(to=blocks)
        spent = _local_steps(frame, blocks, RoundBatches(frame.train_batches, start, K), speed)
        pushes += 1
        time.sleep(link_seconds(frame.H, sum(block_bytes(frame.distributed_models[b].blocks[b]) for b in blocks)))
        dist.send(_header(pushes, int(spent * 1e9), int(waited * 1e9)), dst=0)
        send_tensors([t for b in blocks for t in block_tensors(frame.distributed_models[b].blocks[b])], dst=0)


def spawned_worker(rank: int, H: dict[str, Any], plan: AsyncPlan, rendezvous: str) -> None:
    """Entry point of a spawned worker: its own frame (same seed), the group through the file store, the loop."""
    torch.set_num_threads(plan.threads)
    device = torch.device(plan.devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    frame = generate_ModelFrame(H, owned_blocks=plan.blocks_of[rank - 1], device=device, block_copies=True)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=plan.world)
    try:
        worker_loop(frame, plan, rank)
    finally:
        dist.destroy_process_group()


def torchrun_worker(H: dict[str, Any]) -> None:
    """A torchrun rank > 0 (called by ``dol1.main``): a worker of the server on rank 0."""
    env = torchrun_env()
    if env is None or env.rank == 0:
        raise RuntimeError("torchrun_worker is for torchrun ranks > 0 (RANK and WORLD_SIZE must be set)")
    frame = generate_ModelFrame(H, device=torch.device("cpu") if H["cuda_core"] < 0 or not torch.cuda.is_available()
                                else torch.device(f"cuda:{env.local_rank % torch.cuda.device_count()}"),
                                block_copies=True)
    plan = make_plan(frame, env.world_size)
    torch.set_num_threads(plan.threads)
    dist.init_process_group("gloo", init_method="env://")
    try:
        worker_loop(frame, plan, env.rank)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# The server (rank 0)
# --------------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Server(EngineState):
    """Rank 0's state: the stale-synchronous book, each worker's next batch, pending schedule changes, timings."""

    frame: Disributed_frame
    plan: AsyncPlan
    book: StalenessBook = field(init=False)
    cursor: list[int] = field(init=False)
    pending: list[list[dict[str, Any]]] = field(init=False)
    compute: list[float] = field(init=False)
    wait: list[float] = field(init=False)

    def __post_init__(self) -> None:
        n, frame = len(self.plan.blocks_of), self.frame
        self.book = StalenessBook(n, frame.H["max_staleness"], [list(b) for b in self.plan.blocks_of])
        self.cursor, self.compute, self.wait, self.received = [0] * n, [0.0] * n, [0.0] * n, [0] * n
        self.k_in_flight = [0] * n
        self.scratch = copy.deepcopy(frame.center_model.blocks).requires_grad_(False)  # receives pushed blocks
        settings = {"lr": list(frame.current_lrs), **{k: frame.H[k] for k in KEYS}}
        if frame.pool_size is not None:
            settings.update(order=frame.pool_order, pool_size=frame.pool_size)
        self.pending = [[to_cpu(settings)] for _ in range(n)]  # a (re)started worker gets every setting once
        self.round_dev: list[tuple[int, list[float]]] = []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.book = StalenessBook.from_state(state["book"])
        self.book.read_at = [None] * self.book.n  # the checkpoint drained every update in flight
        self.cursor, self.compute, self.wait = list(state["cursor"]), list(state["compute"]), list(state["wait"])

    def state_dict(self) -> dict[str, Any]:
        return {"book": self.book.state_dict(), "cursor": list(self.cursor), "compute": list(self.compute),
                "wait": list(self.wait)}

    def metrics(self) -> dict[str, Any]:
        return {"worker_compute_time": list(self.compute), "worker_wait_time": list(self.wait), **self.book.record()}

    def reply(self, w: int, command: int = GO) -> None:
        if command != GO:
            dist.send(_header(command), dst=w + 1)
            return
        frame, K = self.frame, self.frame.H["K"]
        changes, self.pending[w] = self.pending[w], []
        dist.send(_header(GO, self.cursor[w], K, len(changes)), dst=w + 1)
        frame.send(w, send_tensors(block_tensors(frame.center_model), w + 1))  # the worker sleeps its link time
        if changes:
            dist.send_object_list(changes, dst=w + 1)
        self.book.on_read(w)
        self.cursor[w] += K
        self.k_in_flight[w] = K

    def receive(self) -> int:
        """The next push from any worker, into the scratch blocks; returns the worker."""
        header = _header()
        w = dist.recv(header) - 1
        pushes, compute_ns, wait_ns, _ = header.tolist()
        self.received[w] += 1
        if pushes != self.received[w]:
            raise RuntimeError(f"worker {w} (rank {w + 1}) says it pushed {pushes} updates; the server received "
                               f"{self.received[w]}: an update was lost")
        blocks = self.plan.blocks_of[w]
        self.frame.send(w, recv_tensors([t for b in blocks for t in block_tensors(self.scratch[b])], w + 1))
        self.compute[w] += compute_ns / 1e9
        self.wait[w] += wait_ns / 1e9
        return w

    def apply(self, w: int) -> None:
        frame = self.frame
        for b in self.plan.blocks_of[w]:
            self.round_dev.append((b, squared_deviation(self.scratch[b], frame.center_model.blocks[b])))
            frame.gather_block(b, self.scratch[b])
        self.book.on_write(w)
        blocks = len(self.plan.blocks_of[w])
        count_step(frame, frame.train_batches.batch_size, blocks, steps=self.k_in_flight[w] * blocks)

    def serve(self) -> None:
        for w in range(self.book.n):
            if self.book.may_start(w):
                self.reply(w)

    def step(self, frame: Frame, round_index: int) -> float:
        """Serve reads and apply pushes until the round's B block updates are in; returns the deviation."""
        t0, busiest = time.perf_counter(), max(self.compute)
        if frame.round_changes:
            for queue in self.pending:
                queue.append(to_cpu(frame.round_changes))
        target, self.round_dev = (round_index + 1) * frame.n_blocks, []
        self.serve()
        while self.book.block_updates < target:
            w = self.receive()
            self.apply(w)
            if self.book.block_updates < target:
                self.serve()
        count_step(frame, 0, 0, steps=0, new_samples=frame.H["K"] * frame.train_batches.batch_size)
        frame.timers["compute"] = max(self.compute)  # the busiest worker's compute (straggler sleep included)
        frame.timers["communication"] += max(0.0, time.perf_counter() - t0 - (max(self.compute) - busiest))
        return round_deviation(self.round_dev)

    def ranks_state(self) -> dict[str, Any]:
        """A barrier: apply the updates in flight, then every worker hands its state over."""
        while self.book.in_flight():
            self.apply(self.receive())
        for w in range(self.book.n):
            self.reply(w, CHECKPOINT)
        return gather_states(self.frame, 0, self.plan.world)

    def stop(self) -> None:
        """Every worker gets STOP; updates still in flight are received and dropped."""
        for w in range(self.book.n):
            if self.book.read_at[w] is None:
                self.reply(w, STOP)
        while self.book.in_flight():
            w = self.receive()
            self.book.on_drop(w)
            self.reply(w, STOP)


def check_async_engine(frame: Frame) -> None:
    """The simulator's checks, plus the process count under torchrun."""
    check_async(frame)
    env = torchrun_env()
    if env is not None:
        make_plan(frame, env.world_size)


def _start(frame: Frame, plan: AsyncPlan, pool: WorkerPool | None) -> None:
    """Join the group: from torchrun's environment, or after spawning the workers (file-store rendezvous)."""
    if pool is None:
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method="env://")
        return
    rendezvous = f"file://{pool.error_dir / 'rendezvous'}"
    with loopback_only():
        pool.start(range(1, plan.world), spawned_worker, lambda rank: (rank, frame.H, plan, rendezvous))
        frame.log("Worker pids: " + ", ".join(f"rank {r} pid {p}" for r, p in pool.pids.items()))
        dist.init_process_group("gloo", init_method=rendezvous, rank=0, world_size=plan.world)


def _serve_run(frame: Disributed_frame, plan: AsyncPlan, progress: Callable[[int, int], None] | None) -> Server:
    prepare(frame, plan, 0)
    server = Server(frame, plan)
    attach_engine(frame, server)
    try:
        training_loop(frame, server.step, progress)
    finally:
        attach_engine(frame, None)
    return server


def train_async(frame: Disributed_frame, progress: Callable[[int, int], None] | None = None) -> Frame:
    """Asynchronous block updates for real: a server rank and one worker process per block or group (gloo)."""
    if not isinstance(frame, Disributed_frame):
        raise TypeError(f"train_async needs a Disributed_frame, got {type(frame).__name__}")
    check_async(frame)
    env = torchrun_env()
    plan = make_plan(frame, env.world_size if env is not None else None)
    t0 = time.perf_counter()
    with engine_processes(plan.threads, env is None, "async_", own_group=not dist.is_initialized(),
                          on_failure=frame.reporter.fail if frame.reporter else None) as pool:
        _start(frame, plan, pool)
        frame.log(f"Asynchronous: server rank 0 and {plan.world - 1} workers ({'torchrun' if env else 'spawned'}, "
                  f"gloo), blocks by worker {[list(b) for b in plan.blocks_of]}, speeds {list(plan.speeds)}, "
                  f"{plan.threads} threads each; start-up {time.perf_counter() - t0:.1f} s")
        server = _serve_run(frame, plan, progress)
        if pool is not None:
            pool.expect_exit()
        server.stop()
        if pool is not None:
            pool.join()
        draw_staleness(frame)
        frame.log(async_summary(server.book, frame.n_blocks) + f"; compute s per worker "
                  f"{[round(c, 2) for c in server.compute]}, waiting s {[round(w, 2) for w in server.wait]}")
    return frame
