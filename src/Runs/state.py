"""The per-process pieces of a checkpoint: RNG states and block copies stored as their differences from the centre.

The seam between this wing and the parallel engines, which gather these pieces from every rank for a checkpoint
and hand them back on resume (``parallel/distributed_state.py``).
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn


def rng_state() -> dict[str, Any]:
    """This process's random generators (torch, CUDA, NumPy, Python), as plain containers and tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss": py_gauss}}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def copy_differences(replica: nn.Module, centre: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries of a block copy that differ from the centre's (cloned): after a round's scatter that
    is usually a few BatchNorm buffers, so a checkpoint of a block-wise run is not B times the model."""
    mine, theirs = replica.state_dict(), centre.state_dict()
    return {k: v.detach().clone() for k, v in mine.items() if not torch.equal(v, theirs[k])}


def apply_copy_state(replica: nn.Module, centre: nn.Module, differences: dict[str, torch.Tensor]) -> None:
    """Make ``replica`` equal to ``centre`` except for ``differences`` (in place)."""
    theirs = centre.state_dict()
    with torch.no_grad():
        for name, tensor in replica.state_dict().items():
            tensor.copy_(differences.get(name, theirs[name]))
