"""Checkpoint and resume for the multi-process engine: the per-rank state that rank 0 gathers and hands back.

Each rank owns the copies and optimisers of its blocks and its own RNG. For a checkpoint, rank 0 sends the
CHECKPOINT command and every rank answers with :func:`local_state` through one ``gather_object``; rank 0 merges the
answers into its checkpoint (the engine's ``ranks_state``). The memory unit's ``MEMORY`` command gathers every rank's
memory figures the same way (``ranks_memory``). On resume, rank 0 — whose frame was built with every copy and
restored from the checkpoint — broadcasts :func:`handoff` once, before the first round, and every rank loads its
own blocks and RNG with :func:`apply_handoff`. Tensors travel on the CPU (gloo and NCCL alike).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from src.Runs.state import apply_copy_state, copy_differences, rng_state, set_rng_state
from src.Buliding_Units.memory import process_memory
from src.Buliding_Units.Model_frames import Disributed_frame

CHECKPOINT = -2  # the command that asks every rank for its state
MEMORY = -3  # the command that asks every rank for its memory figures (the engine's ``ranks_memory``)


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (nested in dicts, lists, tuples) moved to the CPU, for object collectives."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def broadcast_command(device: torch.device | str, value: int = 0,
                      changes: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """Rank 0 sends ``value`` (a round or batch index, or a negative command such as STOP or CHECKPOINT) and the
    round's schedule changes, if any (a second broadcast, only then); every rank returns both. ``device``: where
    the process group's backend communicates (cuda for nccl)."""
    t = torch.tensor([value, 1 if changes else 0], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    if not t[1].item():
        return int(t[0].item()), {}
    box = [to_cpu(changes or {})]
    dist.broadcast_object_list(box, src=0)
    return int(t[0].item()), box[0]


def local_state(frame: Disributed_frame, rank: int) -> dict[str, Any]:
    """This rank's block copies (as differences from the centre), block optimisers and RNG state."""
    return to_cpu({"copies": {b: copy_differences(m, frame.center_model) for b, m in frame.distributed_models.items()},
                 "block_optimizers": {b: o.state_dict() for b, o in frame.block_optimizers.items()},
                 "rng": {rank: rng_state()}})


def gather_states(frame: Disributed_frame, rank: int, world_size: int) -> dict[str, Any] | None:
    """Collective: every rank's :func:`local_state` reaches rank 0, which returns them merged (others: None)."""
    answers: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(local_state(frame, rank) if rank else {}, answers, dst=0)
    if rank != 0:
        return None
    merged: dict[str, Any] = {"copies": {}, "block_optimizers": {}, "rng": {}}
    for answer in answers[1:]:
        for key in merged:
            merged[key].update(answer[key])
    return merged


def gather_memory(frame: Disributed_frame, rank: int, world_size: int, scratch: nn.Module) -> list[Any] | None:
    """Collective: every rank's memory figures (its centre, its copies, its ``scratch`` blocks for received values,
    its peak RSS and CUDA peaks) reach rank 0, which returns them in rank order (others: None)."""
    answers: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(process_memory(frame, scratch), answers, dst=0)
    return answers


def handoff(frame: Disributed_frame) -> dict[str, Any]:
    """On rank 0 after a resume, before its other copies are dropped: what every rank needs to continue."""
    if "rng" not in frame.run.resumed:
        return {}
    state = local_state(frame, 0)
    state.update(rng=dict(frame.run.resumed["rng"]), batch_cursor=frame.batch_cursor, pool_order=frame.pool_order)
    return state


def apply_handoff(frame: Disributed_frame, rank: int, state: dict[str, Any]) -> None:
    """Load this rank's copies, optimisers and RNG from a :func:`handoff` (after the centre was scattered)."""
    if not state:
        return
    for b, replica in frame.distributed_models.items():
        apply_copy_state(replica, frame.center_model, state["copies"].get(b, {}))
        frame.block_optimizers[b].load_state_dict(state["block_optimizers"][b])
    if rank in state["rng"]:
        set_rng_state(state["rng"][rank])
    frame.batch_cursor, frame.pool_order = state["batch_cursor"], state["pool_order"]
