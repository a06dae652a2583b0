"""Who runs where in the multi-process engines: ranks, backend, devices, block ownership, threads (pure planning).

Also the torchrun environment of a process. Nothing here starts a process or touches torch.distributed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from src.Optimizer_Engines.parallel.worker_pool import available_cpus


@dataclass(frozen=True)
class WorkerPlan:
    """Who runs where: ``n`` ranks, the process-group ``backend``, each rank's ``devices[rank]``, the blocks each
    rank owns ``assignment[rank]`` (round-robin: block b → rank b % n) and ``threads`` per process."""

    n: int
    backend: str
    devices: tuple[str, ...]
    assignment: tuple[tuple[int, ...], ...]
    threads: int

    def owner(self, block: int) -> int:
        """The rank that owns ``block``."""
        return block % self.n


def plan_workers(n_blocks: int, n_workers: int, n_gpus: int, n_cpus: int, *, first_gpu: int = 0,
                 procs_per_node: int | None = None) -> WorkerPlan:
    """Choose the number of ranks, the backend, the devices and the block assignment.

    Args:
        n_blocks: blocks of the model.
        n_workers: processes asked for; 0 = one per block, capped at ``n_gpus`` (CUDA) or ``n_cpus`` (CPU).
            Never more than ``n_blocks`` when the engine spawns the workers.
        n_gpus: GPUs to use (0 = CPU run).
        n_cpus: CPU cores of one machine; each process gets ``n_cpus // processes per machine`` threads.
        first_gpu: the GPU of local rank 0 (``--cuda_core``); local rank i uses ``(first_gpu + i) % n_gpus``.
        procs_per_node: under torchrun, the processes per machine (``LOCAL_WORLD_SIZE``); ``n_workers`` is then
            the world size and is used as given. None = the engine spawns all ranks on this machine.

    Returns:
        The plan. NCCL when every process of a machine has a GPU of its own; gloo on the CPU and when processes
        share a GPU (NCCL refuses two ranks on one device).
    """
    if n_blocks < 1:
        raise ValueError(f"a model needs at least one block, got n_blocks={n_blocks}")
    if n_workers < 0:
        raise ValueError(f"n_workers must be >= 0 (0 = auto), got {n_workers}")
    if procs_per_node is None:
        wanted = n_workers if n_workers > 0 else (n_gpus if n_gpus > 0 else n_cpus)
        n = max(1, min(wanted, n_blocks))
        per_node = n
    else:
        if n_workers < 1 or procs_per_node < 1:
            raise ValueError(f"torchrun needs a world size and processes per node >= 1, got {n_workers} and "
                             f"{procs_per_node}")
        n, per_node = n_workers, procs_per_node
    if n_gpus > 0:
        # ranks are numbered node by node, so rank r is local rank r % per_node
        devices = tuple(f"cuda:{(first_gpu + r % per_node) % n_gpus}" for r in range(n))
        backend = "nccl" if per_node <= n_gpus else "gloo"
    else:
        devices, backend = ("cpu",) * n, "gloo"
    assignment = tuple(tuple(range(r, n_blocks, n)) for r in range(n))
    return WorkerPlan(n, backend, devices, assignment, max(1, n_cpus // per_node))


@dataclass(frozen=True)
class TorchrunEnv:
    """The rendezvous variables torchrun sets for each process."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """The torchrun variables of this process, or None when it was not launched by torchrun."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world = int(env["WORLD_SIZE"])
    return TorchrunEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", env["RANK"])),
                       int(env.get("LOCAL_WORLD_SIZE", world)))


def torchrun_rank() -> int:
    """This process's torchrun rank (0 when not under torchrun); ``dol1.py`` sends ranks > 0 to the worker."""
    env = torchrun_env()
    return env.rank if env is not None else 0


def gpu_count(device: torch.device) -> int:
    return torch.cuda.device_count() if device.type == "cuda" else 0


def torchrun_plan(n_blocks: int, env: TorchrunEnv, device: torch.device) -> WorkerPlan:
    return plan_workers(n_blocks, env.world_size, gpu_count(device), available_cpus(),
                        first_gpu=device.index or 0, procs_per_node=env.local_world_size)
