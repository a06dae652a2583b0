"""Data-parallel ``--training_mode entire`` under torchrun (world size > 1): the baseline for block parallelism.

Every rank holds the whole model wrapped in ``DistributedDataParallel``. Step t uses the same global batch t of the
seeded sequence as a single process (``frame.train_batches[t]``, computed on every rank from the seed; data never
travels), and rank r takes rows ``[r·B/W, (r+1)·B/W)`` of it (B the global batch, W the world size). Each rank's
mean loss is weighted by its share of the rows (``n_r·W/B``), so DDP's averaged gradient is exactly the gradient of
the global batch's mean loss, uneven shards included: one process reproduces a world-size-W run up to the rounding
of the all-reduce (tested to 1e-10 in float64). BatchNorm is the exception, as in any DDP: each rank normalises
with its own shard's statistics, and the running statistics are rank 0's (broadcast before every forward).

Rank 0 holds the real Frame (report, plugins, checkpoints) and runs ``training_loop``; before every step it
broadcasts the batch index and the round's schedule changes (``STOP`` ends the other ranks' loop), so stoppers,
schedules and interrupts act on every rank at the same round boundary. Ranks > 0 (``ddp_worker``, sent there by
``dol1.main``) build the same frame from the same seed and write nothing; after a resume rank 0 hands them its
optimiser state, learning rates and curriculum pool once. Counters are the global ones: ``steps`` += 1 and
``samples`` += B per step (``loop.count_step``, as one entire-model step); ``bytes_sent`` += 2·(W−1)·(gradient bytes)
per step (the volume a ring all-reduce moves across the group) plus (W−1)·(buffer bytes) for DDP's buffer broadcast,
counted message by message on the link model (``step_messages``). DDP overlaps the all-reduce with the
backward pass, so the whole step counts as compute time.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from src.Buliding_Units.Model_frames import Frame, generate_ModelFrame, select_device
from src.Buliding_Units.schedules import apply_changes
from src.cli import ConfigError
from src.Optimizer_Engines.parallel.distributed_state import broadcast_command, to_cpu
from src.Optimizer_Engines.loop import count_step, sync, training_loop
from src.Optimizer_Engines.parallel.worker_plan import TorchrunEnv, WorkerPlan, gpu_count, torchrun_env, torchrun_plan

STOP = -1  # the command that ends the other ranks' loop
COLLECTIVE_TIMEOUT_S = 2 * 3600  # backstop only: ranks > 0 wait in a collective while rank 0 evaluates or measures


def data_parallel_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """The torchrun environment when this process is one of several (world size > 1), else None."""
    env = torchrun_env(environ)
    return env if env is not None and env.world_size > 1 else None


def check_slurm_tasks(environ: Mapping[str, str] | None = None) -> None:
    """Refuse ``srun python dol1.py`` with several tasks but without torchrun's variables: every task would run the
    whole experiment as its own rank 0 and write the same run. (dol1.py does not map SLURM's variables to a process
    group itself, as submitit's ``TorchDistributedEnvironment`` does: torchrun inside the job does that, once.)

    The task count is srun's ``SLURM_STEP_NUM_TASKS``, else ``SLURM_NTASKS`` inside a job step (``SLURM_STEP_ID``
    set). A batch script's own process (``sbatch --ntasks 4`` sets ``SLURM_NTASKS`` but starts one process, with no
    step variables) is not refused.

    Raises:
        ConfigError: naming the variable, its value and the two ways to start the run.
    """
    env = os.environ if environ is None else environ
    if torchrun_env(env) is not None:
        return
    name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    in_step = "SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    tasks = env.get(name, "1") if in_step else "1"
    if tasks.strip().isdigit() and int(tasks) > 1:
        raise ConfigError(f"dol1.py was started as {tasks} SLURM tasks ({name}={tasks}) without torchrun's "
                          f"variables (RANK, WORLD_SIZE): each task would run the whole experiment. Start one task "
                          f"(srun --ntasks 1 python dol1.py ...), or one task per node running torchrun (srun "
                          f"--ntasks-per-node 1 torchrun --nnodes $SLURM_NNODES --nproc_per_node N --rdzv_backend "
                          f"c10d --rdzv_endpoint <first node>:29500 dol1.py ...; see the README, 'Beyond one machine')")


def shard(batch: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s rows of a global batch of ``batch`` rows: ``[rank·batch//world, (rank+1)·batch//world)``."""
    return slice(rank * batch // world, (rank + 1) * batch // world)


def step_bytes(model: nn.Module, world: int) -> int:
    """Bytes one step moves across the group: a ring all-reduce of the gradients, 2·(W−1)·payload, plus DDP's
    broadcast of the buffers from rank 0, (W−1)·payload."""
    grads, buffers = _payloads(model)
    return 2 * (world - 1) * grads + (world - 1) * buffers


def _payloads(model: nn.Module) -> tuple[int, int]:
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return grads, sum(b.numel() * b.element_size() for b in model.buffers())


def step_messages(frame: Frame, world: int) -> float:
    """Count one step's messages on the link model and return the time the group waits for them: a ring
    all-reduce is 2·(W−1) rounds in which every rank sends its 1/W share of the gradients to one neighbour (the ranks
    send in parallel: a round takes its slowest message), then rank 0 broadcasts the buffers (one message)."""
    grads, buffers = _payloads(frame.center_model)
    chunks = [shard(grads, r, world).stop - shard(grads, r, world).start for r in range(world)]
    wait = 0.0
    for step in range(2 * (world - 1)):
        wait += max(frame.send(r, chunks[(r - step) % world]) for r in range(world))
    if buffers:
        wait += frame.send(0, buffers, world - 1)
    return wait


@dataclass
class _Group:
    """This rank in the group: the DDP wrapper, where collectives run, and the per-step byte count."""

    env: TorchrunEnv
    plan: WorkerPlan
    ddp: DistributedDataParallel
    comm_device: torch.device
    bytes_per_step: int


def data_parallel_step(frame: Frame, group: _Group, index: int) -> float:
    """One optimiser step on this rank's rows of global batch ``index`` (every rank calls it with the same index)."""
    t0 = time.perf_counter()
    x, y = frame.train_batches[index]
    rows = shard(len(y), group.env.rank, group.env.world_size)
    weight = (rows.stop - rows.start) * group.env.world_size / len(y)  # DDP averages over ranks: undo it exactly
    frame.optimizer.zero_grad(set_to_none=True)
    (frame.criterion(group.ddp(x[rows]), y[rows]) * weight).backward()
    frame.optimizer.step()
    sync(frame.device)
    frame.timers["compute"] += time.perf_counter() - t0
    count_step(frame, len(y), frame.n_blocks, new_samples=len(y))  # the global batch, as one entire-model step
    wait = step_messages(frame, group.env.world_size)
    if wait > 0:  # the simulated network; DDP overlaps the real all-reduce with the backward pass (compute)
        t1 = time.perf_counter()
        time.sleep(wait)
        frame.timers["communication"] += time.perf_counter() - t1
    return 0.0


def _join(frame: Frame, env: TorchrunEnv) -> _Group:
    """Join the group from torchrun's environment, wrap the model (DDP broadcasts rank 0's parameters and
    buffers) and hand a resumed rank 0's optimiser state, learning rates and curriculum pool to every rank."""
    plan = torchrun_plan(frame.n_blocks, env, frame.device)
    if torch.device(plan.devices[env.rank]) != frame.device:
        raise RuntimeError(f"rank {env.rank} was built on {frame.device}, the plan puts it on {plan.devices[env.rank]}")
    torch.set_num_threads(plan.threads)
    if not dist.is_initialized():
        dist.init_process_group(plan.backend, init_method="env://", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    comm_device = frame.device if plan.backend == "nccl" else torch.device("cpu")
    ddp = DistributedDataParallel(frame.center_model, device_ids=[frame.device.index] if frame.device.type == "cuda"
                                  else None)
    box = [to_cpu({"optimizer": frame.optimizer.state_dict(), "changes": {
        "lr": frame.current_lrs, "order": frame.pool_order, "pool_size": frame.pool_size}})
        if env.rank == 0 and frame.round > 0 else None]
    dist.broadcast_object_list(box, src=0)
    if env.rank > 0 and box[0] is not None:
        frame.optimizer.load_state_dict(box[0]["optimizer"])
        apply_changes(frame, box[0]["changes"])
    return _Group(env, plan, ddp, comm_device, step_bytes(frame.center_model, env.world_size))


def parameter_spread(frame: Frame, group: _Group) -> float:
    """Largest elementwise difference of the parameters and buffers across ranks (0.0 = identical). Collective."""
    with torch.no_grad():
        flat = torch.cat([t.double().reshape(-1) for t in frame.center_model.state_dict().values()
                          if t.is_floating_point()]).to(group.comm_device)
        high, neg_low = flat.clone(), -flat
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(neg_low, op=dist.ReduceOp.MAX)  # max(-x) = -min(x)
        return (high + neg_low).max().item()


def train_data_parallel(frame: Frame, progress: Callable[[int, int], None] | None = None) -> Frame:
    """Rank 0 of a data-parallel run: the shared loop, with every step announced to the other ranks.

    Raises:
        ConfigError: a global batch smaller than the world size (a rank would get no rows).
    """
    env = data_parallel_env()
    assert env is not None and env.rank == 0, env
    if frame.train_batches.batch_size < env.world_size:
        raise ConfigError(f"--batch_size {frame.train_batches.batch_size} is the global batch of a data-parallel run "
                          f"and must be at least the world size {env.world_size}")
    threads_before, t0 = torch.get_num_threads(), time.perf_counter()
    group = _join(frame, env)
    frame.log(f"Data parallel: {env.world_size} ranks (torchrun, DistributedDataParallel), backend "
              f"{group.plan.backend}, devices {list(group.plan.devices)}, {group.plan.threads} threads each, global "
              f"batch {frame.train_batches.batch_size} split by rank; start-up {time.perf_counter() - t0:.1f} s")

    def step(frame: Frame, round_index: int) -> float:
        broadcast_command(group.comm_device, round_index, frame.round_changes)
        return data_parallel_step(frame, group, round_index)

    try:
        training_loop(frame, step, progress)
        broadcast_command(group.comm_device, STOP)
        spread = parameter_spread(frame, group)
        frame.log(f"Parameters across ranks at the end: max difference {spread:.3g}"
                  f"{' (identical)' if spread == 0 else ''}")
    except KeyboardInterrupt:  # at a round boundary (the loop checkpointed): the other ranks wait for a command
        broadcast_command(group.comm_device, STOP)
        raise
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads_before)
    return frame


def ddp_worker(H: dict[str, Any], prepare: Callable[[Frame], Any] | None = None) -> None:
    """A torchrun rank > 0 of ``--training_mode entire`` (called by ``dol1.main``): build the same frame, join the
    group and take the steps rank 0 announces, until STOP. Writes nothing.

    Args:
        H: the resolved settings (the same as rank 0's).
        prepare: a change to the frame once built, the one rank 0's engine makes (the tests cast it to float64).
    """
    env = data_parallel_env()
    if env is None or env.rank == 0:
        raise RuntimeError("ddp_worker is for torchrun ranks > 0 of a world size > 1 (RANK and WORLD_SIZE)")
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 handles a stop at a round boundary and tells the others
        signal.signal(sig, signal.SIG_IGN)
    base = select_device(H["cuda_core"])  # local rank 0's device; local rank i uses the i-th GPU after it
    n_gpus = gpu_count(base)
    device = torch.device(f"cuda:{((base.index or 0) + env.local_rank) % n_gpus}" if n_gpus else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    frame = generate_ModelFrame(H, device=device, block_copies=False)
    if prepare is not None:
        prepare(frame)
    group = _join(frame, env)
    try:
        while True:
            command, changes = broadcast_command(group.comm_device)
            if command == STOP:
                break
            apply_changes(frame, changes)  # the same schedule changes as rank 0, before the step
            data_parallel_step(frame, group, command)
        parameter_spread(frame, group)
    finally:
        dist.destroy_process_group()
