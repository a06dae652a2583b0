"""Memory accounting for the memory unit: tensor bytes of models and optimisers, the bytes autograd saves for
backward in a full step and in each block-local step, the process's peak resident memory, and CUDA peaks per
measurement interval.

Where block-wise training saves memory is in the activations: a block-local step builds the graph only from its
block onwards (the blocks before it run without a graph), so it saves fewer activations than a full step. The
parameters, gradients and optimiser state are the other part (see ``model_bytes``).

Frames and plugins floor: imports nothing of the project.
"""
from __future__ import annotations

import copy
import resource
import sys
from typing import Any, Iterable

import torch
from torch import nn


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """``numel × element_size`` summed over the tensors among ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of every tensor in an optimiser's state dict (Adam: exp_avg, exp_avg_sq, step)."""
    if optimizer is None:
        return 0
    return sum(tensor_bytes(state.values()) for state in optimizer.state.values())


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of a model's parameters, buffers and gradients."""
    return {"parameters": tensor_bytes(model.parameters()), "buffers": tensor_bytes(model.buffers()),
            "gradients": tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)}


def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def saved_tensor_bytes(model: nn.Module, criterion: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward pass and loss of ``model`` (with its current
    ``requires_grad`` flags), counted with ``torch.autograd.graph.saved_tensors_hooks``.

    Counts each storage once (a tensor saved by two operations, or a view, is one allocation) at its full size, and
    leaves out what exists without the graph: the model's parameters and buffers, the inputs and the targets.
    """
    existing = {_storage(t)[0] for t in [*model.parameters(), *model.buffers(), inputs, targets]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        pointer, size = _storage(t)
        if pointer not in existing and size:
            saved[pointer] = size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = criterion(model(inputs), targets)
    del loss  # frees the graph without a backward pass
    return sum(saved.values())


def step_activation_bytes(model: nn.Module, criterion: nn.Module, inputs: torch.Tensor,
                          targets: torch.Tensor) -> dict[str, Any]:
    """Bytes autograd saves in a full step (every parameter trainable) and in each block-local step (only block b
    trainable, as in the block-wise engines' copies), on a private copy of ``model`` in its current mode.

    Returns ``{"full_step": bytes, "block_steps": [bytes of block 0, 1, …]}``. Cost: B + 1 forward passes. The
    random number generators are restored afterwards (dropout draws), so measuring does not change training.
    """
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _probe(copy.deepcopy(model), criterion, inputs, targets)


def _probe(probe: nn.Module, criterion: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    blocks = list(probe.blocks)
    probe.requires_grad_(True)
    result: dict[str, Any] = {"full_step": saved_tensor_bytes(probe, criterion, inputs, targets), "block_steps": []}
    for block in blocks:
        probe.requires_grad_(False)
        block.requires_grad_(True)
        result["block_steps"].append(saved_tensor_bytes(probe, criterion, inputs, targets))
    return result


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started (``getrusage``; Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def cuda_peaks(device: torch.device, reset: bool = True) -> dict[str, int]:
    """Peak CUDA memory allocated and reserved on ``device`` since the last reset; then reset (so each measurement
    reports its own interval)."""
    peaks = {"cuda_peak_allocated": torch.cuda.max_memory_allocated(device),
             "cuda_peak_reserved": torch.cuda.max_memory_reserved(device)}
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peaks


def process_memory(frame: Any, scratch: nn.Module | None = None) -> dict[str, Any]:
    """Bytes this process holds for training: its centre (with the centre optimiser), its block copies (with their
    optimisers), a multi-process rank's ``scratch`` blocks, its peak RSS, and on CUDA the interval's peaks."""
    centre = model_bytes(frame.center_model)
    centre["optimizer_state"] = optimizer_state_bytes(getattr(frame, "optimizer", None))
    replicas = getattr(frame, "distributed_models", {})  # absent in entire mode
    copies = {"parameters": 0, "buffers": 0, "gradients": 0, "optimizer_state": 0}
    for b, replica in replicas.items():
        for key, value in model_bytes(replica).items():
            copies[key] += value
        copies["optimizer_state"] += optimizer_state_bytes(frame.block_optimizers[b])
    record = {"center": centre, "copies": copies, "n_copies": len(replicas),
              "scratch": tensor_bytes([*scratch.parameters(), *scratch.buffers()]) if scratch is not None else 0,
              "cpu_peak_rss": peak_rss_bytes()}
    if frame.device.type == "cuda":
        record.update(cuda_peaks(frame.device))
    return record


def rank_record(rank: int, figures: dict[str, Any]) -> dict[str, Any]:
    """One rank's figures in MB."""
    out = {"rank": rank, "n_copies": figures["n_copies"]}
    for key, value in figures.items():
        if isinstance(value, dict):
            out[f"{key}_MB"] = sum(value.values()) / 1024.0 ** 2
        elif key != "n_copies":
            out[f"{key}_MB"] = value / 1024.0 ** 2
    return out
