"""The multi-process block-wise engine (``--training_mode blockwise``) on torch.distributed.

The same Jacobi algorithm as ``train_blockwise_sequential``, with the blocks spread over persistent worker
processes. Each rank owns the copies (and the optimisers) of blocks ``b`` with ``b % n == rank`` for the whole run,
and one round is:

1. rank 0 broadcasts the round index (or ``STOP``, or ``CHECKPOINT``: every rank sends its state to rank 0, see
   ``distributed_state.py``, or ``MEMORY``: every rank sends its memory figures, for the memory unit): every rank
   leaves the loop in the same round;
2. every rank takes K local steps on each active block it owns, on batches r·K … r·K + K − 1, which it computes
   itself from the seeded sequence (data never travels between processes);
3. one ``all_reduce`` of [deviation², compute time of each rank];
4. each owner broadcasts its active blocks' parameters *and* buffers (BatchNorm statistics, num_batches_tracked),
   flattened into one tensor per dtype; every rank gathers them into its centre with damping ``gamma``
   (``Disributed_frame.gather_block``), sleeps the link model's time of those messages and scatters the centre.

The centre is identical on every rank after each round. Rank 0 holds the real Frame (reporter, plugins) and runs
``training_loop`` with a distributed ``step``, so logging, measurements and stoppers follow the sequential
schedule. Its counters are the global ones: ``steps`` (and the sample-passes of ``loop.count_step``) are the
sum over ranks of the local steps each took, summed in the round's ``all_reduce`` (active blocks × K per round, as
in the sequential engine), and every active block is one block update; ``timers['compute']`` is the
*slowest* rank's compute time of each round and ``timers['communication']`` the rest of rank 0's round time
(waiting, collectives, delay, scatter), so the two add up to the round's wall time; ``bytes_sent`` counts block
payload × (n − 1) receivers per broadcast (the control messages, 8·(n + 2) bytes per round, are left out).

Launch: ``train_blockwise_distributed`` spawns ranks 1 … n−1 (see ``worker_pool``), or, under ``torchrun``, joins
the process group from the environment while ``dol1.py`` sends ranks > 0 to ``torchrun_worker``. ``n_workers = 0``
means one worker per block, capped at the run's thread budget (CPU: the cores this process may use, capped by
``OMP_NUM_THREADS`` as master.py sets it per slot; ``worker_pool.thread_budget``) or at the visible GPUs (CUDA); the
spawned ranks share that budget, ``budget // ranks`` threads each.

Test hook: a spawned or torchrun worker whose rank equals the environment variable ``BLOCKWISE_TEST_FAIL_RANK``
raises a RuntimeError at the start of round ``BLOCKWISE_TEST_FAIL_ROUND`` (default 1).
"""
from __future__ import annotations

import copy
import math
import os
import signal
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from src.blocks import block_tensors
from src.Buliding_Units.Model_frames import Disributed_frame, Frame, generate_ModelFrame, select_device
from src.Buliding_Units.schedules import apply_changes
from src.Optimizer_Engines.parallel.distributed_state import (CHECKPOINT, MEMORY, apply_handoff, broadcast_command,
                                                    gather_memory, gather_states, handoff)
from src.Optimizer_Engines.loop import (EngineState, active_blocks, attach_engine, count_step, local_steps,
                                        round_batches, sync, training_loop)
from src.Optimizer_Engines.parallel.worker_plan import (TorchrunEnv, WorkerPlan, gpu_count, plan_workers, torchrun_env,
                                               torchrun_plan)
from src.Optimizer_Engines.parallel import worker_pool
from src.Optimizer_Engines.parallel.worker_pool import WorkerFailed, WorkerPool, loopback_only, thread_budget
from src.Optimizer_Engines.parallel.worker_session import engine_processes

STOP = -1  # the round command that ends the workers' loop
COLLECTIVE_TIMEOUT = timedelta(hours=2)  # backstop only: workers wait in a collective while rank 0 measures
FAIL_RANK_ENV, FAIL_ROUND_ENV = "BLOCKWISE_TEST_FAIL_RANK", "BLOCKWISE_TEST_FAIL_ROUND"
_ERROR_KEY = "blockwise/error/{rank}"  # torchrun: a failing rank leaves its traceback in the rendezvous store


# --------------------------------------------------------------------------------------------------------------------
# One round, on every rank
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Rank:
    """Per-process state: the plan, this rank, where collectives run, and scratch blocks for received values."""

    plan: WorkerPlan
    rank: int
    comm_device: torch.device  # NCCL: this rank's GPU; gloo: the CPU
    scratch: nn.ModuleList


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[str, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(str(t.dtype), []).append(t)
    return [groups[k] for k in sorted(groups)]


def _broadcast_tensors(state: _Rank, tensors: list[torch.Tensor], src: int) -> int:
    """Broadcast ``tensors`` from rank ``src`` into the same-shaped ``tensors`` of every rank, one flat tensor per
    dtype; returns the payload bytes broadcast."""
    sent = 0
    with torch.no_grad():
        for group in _by_dtype(tensors):
            if state.rank == src:
                flat = torch.cat([t.detach().reshape(-1) for t in group]).to(state.comm_device)
            else:
                flat = torch.empty(sum(t.numel() for t in group), dtype=group[0].dtype, device=state.comm_device)
            dist.broadcast(flat, src=src)
            if state.rank != src:
                offset = 0
                for t in group:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
            sent += flat.numel() * flat.element_size()
    return sent


def _maybe_fail_for_test(rank: int, round_index: int) -> None:
    if os.environ.get(FAIL_RANK_ENV) == str(rank) and round_index == int(os.environ.get(FAIL_ROUND_ENV, "1")):
        raise RuntimeError(f"{FAIL_RANK_ENV} test hook: rank {rank} fails in round {round_index}")


def distributed_round(frame: Disributed_frame, state: _Rank, round_index: int, started: float) -> float:
    """One round on this rank (every rank calls it with the same index); returns the global deviation."""
    H, plan = frame.H, state.plan
    if state.rank > 0:
        _maybe_fail_for_test(state.rank, round_index)
    blocks = active_blocks(round_index, frame.n_blocks, H["active_share"], H["seed"], H["block_order"])
    mine = [b for b in blocks if plan.owner(b) == state.rank]
    batches = round_batches(frame, round_index)
    for b in mine:
        local_steps(frame.distributed_models[b], frame.block_optimizers[b], frame.criterion, batches)
    sync(frame.device)
    compute = time.perf_counter() - started

    # deviation before the gather, the local steps each rank took and every rank's compute time, in one collective
    stats = torch.zeros(2 + plan.n, dtype=torch.float64, device=state.comm_device)
    stats[0] = frame.deviation(mine) ** 2
    stats[1] = len(mine) * H["K"]  # exact in float64 far beyond any run's length
    stats[2 + state.rank] = compute
    dist.all_reduce(stats)
    stats = stats.tolist()

    link = 0.0
    for owner in sorted({plan.owner(b) for b in blocks}):
        owned = [b for b in blocks if plan.owner(b) == owner]
        # the owner sends from its copies; every other rank receives into its scratch blocks
        sources = {b: frame.distributed_models[b].blocks[b] if owner == state.rank else state.scratch[b]
                   for b in owned}
        payload = _broadcast_tensors(state, [t for b in owned for t in block_tensors(sources[b])], owner)
        link += frame.send(owner, payload, plan.n - 1)  # one message per owner, for the n − 1 other ranks
        for b in owned:
            frame.gather_block(b, sources[b])
    if link > 0:  # the simulated network: every rank waits the same modelled time
        time.sleep(link)
    frame.scatter(blocks)
    sync(frame.device)

    slowest = max(stats[2:])
    frame.timers["compute"] += slowest
    frame.timers["communication"] += max(0.0, time.perf_counter() - started - slowest)
    count_step(frame, batches.stream.batch_size, len(blocks), steps=round(stats[1]), new_samples=batches.samples)
    return math.sqrt(stats[0])


def _prepare(frame: Disributed_frame, plan: WorkerPlan, rank: int) -> _Rank:
    """Keep only this rank's copies, make every centre equal to rank 0's and scatter it into the copies; after a
    resume, every rank then loads its own copies, optimisers and RNG from rank 0's checkpoint."""
    resumed = [handoff(frame) if rank == 0 else None]
    for b in [b for b in frame.distributed_models if plan.owner(b) != rank]:
        del frame.distributed_models[b], frame.block_optimizers[b]  # rank 0's frame was built with every copy
    comm_device = frame.device if plan.backend == "nccl" else torch.device("cpu")
    scratch = copy.deepcopy(frame.center_model.blocks).requires_grad_(False)  # receives other ranks' blocks
    state = _Rank(plan, rank, comm_device, scratch)
    _broadcast_tensors(state, block_tensors(frame.center_model), src=0)
    frame.scatter()
    dist.broadcast_object_list(resumed, src=0)
    apply_handoff(frame, rank, resumed[0])
    for replica in frame.distributed_models.values():
        replica.train()
    return state


def centre_spread(frame: Disributed_frame, state: _Rank) -> float:
    """Largest elementwise difference of the centre (parameters and buffers) across ranks; 0.0 = identical.

    Collective: every rank must call it.
    """
    with torch.no_grad():
        flat = torch.cat([t.double().reshape(-1) for t in block_tensors(frame.center_model)]).to(state.comm_device)
        high, neg_low = flat.clone(), -flat
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(neg_low, op=dist.ReduceOp.MAX)  # max(-x) = -min(x)
        return (high + neg_low).max().item()


def worker_loop(frame: Disributed_frame, plan: WorkerPlan, rank: int) -> None:
    """A rank > 0: prepare, run the rounds rank 0 commands until STOP, then the final centre check."""
    state = _prepare(frame, plan, rank)
    while True:
        command, changes = broadcast_command(state.comm_device)
        if command == STOP:
            break
        apply_changes(frame, changes)  # the same schedule changes as rank 0, before the round
        if command == CHECKPOINT:
            gather_states(frame, rank, plan.n)
        elif command == MEMORY:
            gather_memory(frame, rank, plan.n, state.scratch)
        else:
            distributed_round(frame, state, command, time.perf_counter())
    centre_spread(frame, state)


# --------------------------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------------------------
def _use_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)


def spawned_worker(rank: int, H: dict[str, Any], plan: WorkerPlan, rendezvous: str) -> None:
    """Entry point of spawned rank ``rank``: build its own frame (same seed, so the same initial centre), join the
    group through the file store ``rendezvous`` and follow rank 0."""
    torch.set_num_threads(plan.threads)
    device = torch.device(plan.devices[rank])
    _use_device(device)
    frame = generate_ModelFrame(H, owned_blocks=plan.assignment[rank], device=device, block_copies=True)
    dist.init_process_group(plan.backend, init_method=rendezvous, rank=rank,
                            world_size=plan.n, timeout=COLLECTIVE_TIMEOUT)
    try:
        worker_loop(frame, plan, rank)
    finally:
        dist.destroy_process_group()


def torchrun_worker(H: dict[str, Any]) -> None:
    """A torchrun rank > 0 (called by ``dol1.main``): join the group from the environment and follow rank 0.

    Writes nothing; a failure leaves its traceback in the rendezvous store for rank 0's report, then re-raises.
    """
    env = torchrun_env()
    if env is None or env.rank == 0:
        raise RuntimeError("torchrun_worker is for torchrun ranks > 0 (RANK and WORLD_SIZE must be set)")
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 handles a stop: it checkpoints with every rank's state
        signal.signal(sig, signal.SIG_IGN)
    base = select_device(H["cuda_core"])  # local rank 0's device; local rank i uses the i-th GPU after it
    n_gpus = gpu_count(base)
    device = torch.device(f"cuda:{((base.index or 0) + env.local_rank) % n_gpus}" if n_gpus else "cpu")
    _use_device(device)
    frame = generate_ModelFrame(H, device=device, block_copies=True)  # every copy; _prepare keeps this rank's
    plan = torchrun_plan(frame.n_blocks, env, base)
    assert torch.device(plan.devices[env.rank]) == device, (plan, device)
    torch.set_num_threads(plan.threads)
    dist.init_process_group(plan.backend, init_method="env://", timeout=COLLECTIVE_TIMEOUT)
    try:
        worker_loop(frame, plan, env.rank)
    except BaseException:
        dist.distributed_c10d._get_default_store().set(_ERROR_KEY.format(rank=env.rank), traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _torchrun_failure(world_size: int) -> WorkerFailed | None:
    """Under torchrun: the first rank > 0 that left a traceback in the store, if any."""
    store = dist.distributed_c10d._get_default_store()
    for rank in range(1, world_size):
        key = _ERROR_KEY.format(rank=rank)
        if store.check([key]):
            return WorkerFailed(rank, None, None, store.get(key).decode())
    return None


def _plan(frame: Disributed_frame, env: TorchrunEnv | None) -> WorkerPlan:
    if env is not None:
        return torchrun_plan(frame.n_blocks, env, frame.device)
    plan = plan_workers(frame.n_blocks, frame.H["n_workers"], gpu_count(frame.device), thread_budget(),
                        first_gpu=frame.device.index or 0)
    cores = worker_pool.available_cpus()
    if frame.H["n_workers"] == 0 and not gpu_count(frame.device) and plan.n < min(frame.n_blocks, cores):
        # automatic count held below the cores by OMP_NUM_THREADS (master.py's slot cap, or a cluster's habit of 1)
        note = (f"n_workers 0 (automatic): {plan.n} worker process(es), capped by OMP_NUM_THREADS="
                f"{os.environ.get('OMP_NUM_THREADS')} below the {cores} cores; give --n_workers N for more")
        frame.log(note)
        warnings.warn(note, stacklevel=2)
    return plan


def _start_group(frame: Disributed_frame, plan: WorkerPlan, own_group: bool, pool: WorkerPool | None) -> None:
    """Join the process group: from torchrun's environment (no pool), or after spawning ranks 1 … n−1 in
    ``pool``."""
    if pool is None:
        if own_group:
            dist.init_process_group(plan.backend, init_method="env://", timeout=COLLECTIVE_TIMEOUT)
        return
    # A file store, not tcp://127.0.0.1:port: a TCPStore listens on every interface whatever address it is given,
    # the file store opens no port; gloo's own pair sockets stay on loopback (GLOO_SOCKET_IFNAME, set by the caller).
    rendezvous = f"file://{pool.error_dir / 'rendezvous'}"
    with loopback_only():
        pool.start(range(1, plan.n), spawned_worker, lambda rank: (rank, frame.H, plan, rendezvous))
        frame.log("Worker pids: " + ", ".join(f"rank {r} pid {p}" for r, p in pool.pids.items()))
        dist.init_process_group(plan.backend, init_method=rendezvous, rank=0,
                                world_size=plan.n, timeout=COLLECTIVE_TIMEOUT)


def _stop_workers(frame: Disributed_frame, state: _Rank, pool: WorkerPool | None) -> None:
    """Send STOP, compare the centre across ranks, and log it."""
    if pool is not None:
        pool.expect_exit()
    broadcast_command(state.comm_device, STOP)
    spread = centre_spread(frame, state)
    if pool is not None:
        pool.join()
    frame.log(f"Centre after the last round: largest difference across the {state.plan.n} ranks = {spread:.3g}"
              + (" (identical)" if spread == 0 else ""))
    if spread != 0:
        warnings.warn(f"the centre models of the ranks differ by up to {spread:.3g} after the run", stacklevel=2)


def _train_rank0(frame: Disributed_frame, state: _Rank, progress: Callable[[int, int], None] | None) -> None:
    rounds_before, bytes_before = frame.round, frame.bytes_sent

    def step(frame: Disributed_frame, round_index: int) -> float:
        started = time.perf_counter()
        broadcast_command(state.comm_device, round_index, frame.round_changes)
        return distributed_round(frame, state, round_index, started)

    class Ranks(EngineState):
        """Rank 0's view of the other ranks: their state for a checkpoint, their memory figures."""

        def ranks_state(self) -> dict[str, Any]:
            broadcast_command(state.comm_device, CHECKPOINT)
            return gather_states(frame, 0, state.plan.n)

        def ranks_memory(self) -> list[dict[str, Any]]:
            broadcast_command(state.comm_device, MEMORY)
            return gather_memory(frame, 0, state.plan.n, state.scratch)

    attach_engine(frame, Ranks())
    try:
        training_loop(frame, step, progress)
    finally:
        attach_engine(frame, None)
    rounds = frame.round - rounds_before
    frame.log(f"Communication: {(frame.bytes_sent - bytes_before) / max(rounds, 1):.0f} bytes per round "
              f"(block payload x {state.plan.n - 1} receivers) over {rounds} rounds; compute "
              f"{frame.timers['compute']:.2f} s (slowest rank), communication "
              f"{frame.timers['communication']:.2f} s")


def train_blockwise_distributed(frame: Disributed_frame,
                                progress: Callable[[int, int], None] | None = None) -> Frame:
    """One worker process per block (or group of blocks) on torch.distributed; the Jacobi algorithm.

    Rank 0 is this process (see the module docstring).

    Raises:
        WorkerFailed: a worker raised or died (its traceback is in the message).
    """
    if not isinstance(frame, Disributed_frame):
        raise TypeError(f"train_blockwise_distributed needs a Disributed_frame, got {type(frame).__name__}")
    env = torchrun_env()
    plan = _plan(frame, env)
    assert torch.device(plan.devices[0]) == frame.device, (plan, frame.device)  # rank 0 trains where it was built
    t0 = time.perf_counter()
    own_group = not (env is not None and dist.is_initialized())  # under torchrun, a caller may have joined already
    with engine_processes(plan.threads, env is None, "blockwise_", own_group,
                          on_failure=frame.reporter.fail if frame.reporter else None,
                          torchrun_failure=lambda: _torchrun_failure(plan.n)) as pool:
        _start_group(frame, plan, own_group, pool)
        state = _prepare(frame, plan, 0)
        frame.log(f"Distributed: {plan.n} ranks ({'torchrun' if env else 'spawned'}), backend {plan.backend}, "
                  f"devices {list(plan.devices)}, {plan.threads} threads each, blocks by rank "
                  f"{[list(a) for a in plan.assignment]}; start-up {time.perf_counter() - t0:.1f} s")
        _train_rank0(frame, state, progress)
        _stop_workers(frame, state, pool)
    return frame
