"""A block's tensors in one fixed order, and the copies between block-compatible models built on it.

Every place that moves a block's values (``copy_block``, ``copy_model``, the frames' gather and scatter, the
multi-process engine's broadcasts) goes through :func:`block_tensors`, so the order in which parameters and
buffers travel is defined once: parameters in registration order, then buffers (BatchNorm running statistics and
``num_batches_tracked``) in registration order.

Ground floor: imports nothing of the project.
"""
from __future__ import annotations

import torch
from torch import nn


def named_block_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter, then every buffer, of ``module`` in registration order."""
    return list(module.named_parameters()) + list(module.named_buffers())


def block_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter, then every buffer, of ``module`` (a block or a whole model) in registration order."""
    return [t for _, t in named_block_tensors(module)]


def block_bytes(module: nn.Module) -> int:
    """Bytes of a block's parameters and buffers: what a message carrying the block sends."""
    return sum(t.numel() * t.element_size() for t in block_tensors(module))


def _copy_state(src: nn.Module, dst: nn.Module, what: str) -> None:
    src_state, dst_state = dict(named_block_tensors(src)), dict(named_block_tensors(dst))
    if src_state.keys() != dst_state.keys():
        missing = sorted(src_state.keys() ^ dst_state.keys())
        raise ValueError(f"cannot copy {what}: tensor names differ ({missing[:5]}...)")
    with torch.no_grad():
        for name, tensor in src_state.items():
            target = dst_state[name]
            if target.shape != tensor.shape:
                raise ValueError(f"cannot copy {what}: {name} has shape {tuple(tensor.shape)} in the source "
                                 f"and {tuple(target.shape)} in the destination")
            target.copy_(tensor)  # in place: storage is never shared


def copy_block(src_block: nn.Module, dst_block: nn.Module) -> None:
    """Copy parameters and buffers (e.g. BatchNorm running statistics) of one block into another, in place.

    Raises:
        ValueError: when the blocks' tensor names or shapes differ.
    """
    _copy_state(src_block, dst_block, "block")


def copy_model(src: nn.Module, dst: nn.Module) -> None:
    """Copy every parameter and buffer of ``src`` into the block-compatible model ``dst``, in place."""
    _copy_state(src, dst, "model")
