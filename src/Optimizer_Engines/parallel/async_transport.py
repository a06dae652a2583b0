"""Transport and planning of the real asynchronous engine: who runs where, and blocks as flat CPU tensors over
point-to-point gloo messages (see ``async_engine``'s docstring for the protocol)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from src.blocks import block_tensors
from src.Buliding_Units.Model_frames import Disributed_frame, Frame
from src.Optimizer_Engines.parallel.async_book import assign_blocks, check_speeds
from src.Optimizer_Engines.parallel.distributed_state import apply_handoff, handoff
from src.Optimizer_Engines.parallel.worker_pool import available_cpus, thread_budget


@dataclass(frozen=True)
class AsyncPlan:
    """Ranks: 0 the server, 1 … W the workers; ``blocks_of[w]`` the blocks of worker w (rank w + 1)."""

    blocks_of: tuple[tuple[int, ...], ...]
    speeds: tuple[float, ...]
    threads: int
    devices: tuple[str, ...] = ()

    @property
    def world(self) -> int:
        return len(self.blocks_of) + 1


def make_plan(frame: Frame, world: int | None = None) -> AsyncPlan:
    """The workers of ``frame``'s run: ``n_workers`` (0 = one per block), or ``world - 1`` under torchrun. Spawned
    workers share the run's thread budget (the cores, capped by ``OMP_NUM_THREADS`` as master.py sets it per slot)."""
    blocks_of = assign_blocks(frame.n_blocks, frame.H["n_workers"] if world is None else world - 1)
    if world is not None and len(blocks_of) != world - 1:
        raise ValueError(f"--training_mode async under torchrun: {world} processes = a server and {world - 1} "
                         f"workers, but the model has only {frame.n_blocks} blocks; start at most "
                         f"{frame.n_blocks + 1} processes")
    n_gpus = torch.cuda.device_count() if frame.device.type == "cuda" else 0
    devices = (str(frame.device),) + tuple(f"cuda:{w % n_gpus}" if n_gpus else "cpu" for w in range(len(blocks_of)))
    return AsyncPlan(tuple(tuple(b) for b in blocks_of), tuple(check_speeds(frame.H["worker_speeds"],
                                                                            len(blocks_of))),
                     max(1, (thread_budget() if world is None else available_cpus()) // len(blocks_of)), devices)


def _groups(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[str, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(str(t.dtype), []).append(t)
    return [groups[k] for k in sorted(groups)]


def send_tensors(tensors: list[torch.Tensor], dst: int) -> int:
    """Send ``tensors`` as one flat CPU tensor per dtype; returns the bytes sent."""
    sent = 0
    with torch.no_grad():
        for group in _groups(tensors):
            flat = torch.cat([t.detach().reshape(-1).cpu() for t in group])
            dist.send(flat, dst=dst)
            sent += flat.numel() * flat.element_size()
    return sent


def recv_tensors(tensors: list[torch.Tensor], src: int) -> int:
    """Receive what :func:`send_tensors` sent into the same-shaped ``tensors``; returns the bytes received."""
    got = 0
    with torch.no_grad():
        for group in _groups(tensors):
            flat = torch.empty(sum(t.numel() for t in group), dtype=group[0].dtype)
            dist.recv(flat, src=src)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
            got += flat.numel() * flat.element_size()
    return got


def header(*values: int) -> torch.Tensor:
    return torch.tensor(list(values) + [0] * (4 - len(values)), dtype=torch.int64)


def prepare(frame: Disributed_frame, plan: AsyncPlan, rank: int) -> None:
    """Collective, once: keep only this rank's copies, make every centre equal to rank 0's, hand over a resumed
    run's per-rank state."""
    resumed = [handoff(frame) if rank == 0 else None]
    mine = set(plan.blocks_of[rank - 1]) if rank else set()
    for b in [b for b in frame.distributed_models if b not in mine]:
        del frame.distributed_models[b], frame.block_optimizers[b]
    with torch.no_grad():
        for t in block_tensors(frame.center_model):
            buffer = t.detach().cpu().clone()
            dist.broadcast(buffer, src=0)
            t.copy_(buffer)
    frame.scatter()
    dist.broadcast_object_list(resumed, src=0)
    apply_handoff(frame, rank, resumed[0])
    for replica in frame.distributed_models.values():
        replica.train()
