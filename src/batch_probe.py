"""The batch-size probe: the largest training batch that fits in memory (``--batch_size 0``).

Ground floor: imports only the utilities.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from src.utils import available_host_bytes


def _largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int:
    """Largest b in [low, high] with ``fits(b)``, assuming monotonicity: doubling, then bisection. 0 if none."""
    if not fits(low):
        return 0
    good, bad = low, None
    while bad is None and good < high:
        trial = min(good * 2, high)
        if fits(trial):
            good = trial
        else:
            bad = trial
    if bad is None:
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _cuda_fits(model: nn.Module, sample: torch.Tensor, device: torch.device,
               criterion: Callable | None) -> Callable[[int], bool]:
    def fits(batch: int) -> bool:
        try:
            x = sample.to(device).unsqueeze(0).expand(batch, *sample.shape).contiguous()
            out = model(x)
            loss = criterion(out) if criterion is not None else out.float().pow(2).mean()
            loss.backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return fits


def _saved_bytes(model: nn.Module, sample: torch.Tensor, batch: int) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one forward at ``batch``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = sample.unsqueeze(0).expand(batch, *sample.shape).contiguous()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def get_max_batch_size(model: nn.Module, sample: torch.Tensor, device: torch.device | str = "cpu", *,
                       criterion: Callable | None = None, low: int = 1, high: int = 65536, safety: float = 0.8,
                       fits: Callable[[int], bool] | None = None, free_bytes: int | None = None) -> int:
    """Largest training batch size that fits in memory, times a safety margin.

    On CUDA: real forward+backward probes, doubling then bisection, catching out-of-memory (the model's
    activations dominate, so dividing memory by one input's size would be far off). On CPU: an estimate,
    ``free memory / measured per-sample footprint``, where the footprint is the bytes autograd saves per sample
    (measured from forwards at batch 1 and 2) plus the input itself; parameters, gradients and optimiser state
    are subtracted from the free memory first (3 × parameter bytes, as for Adam).

    Args:
        model: the model, already on ``device``.
        sample: one input without the batch dimension.
        device: where to probe.
        criterion: maps the output to a scalar loss (default: mean square of the output).
        low, high: search range.
        safety: fraction of the found size that is returned.
        fits: inject a ``batch -> bool`` probe (tests; custom memory limits). Overrides the device probe.
        free_bytes: inject the free memory for the CPU estimate.

    Returns:
        The batch size (at least ``low`` if any fits, else 0).
    """
    device = torch.device(device)
    if fits is None and device.type == "cuda":
        fits = _cuda_fits(model, sample, device, criterion)
    if fits is not None:
        best = _largest_fitting(fits, low, high)
        return max(min(low, best), int(best * safety))
    with torch.enable_grad():
        per_sample = _saved_bytes(model, sample, 2) - _saved_bytes(model, sample, 1)
    per_sample = max(per_sample, 0) + sample.numel() * sample.element_size()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    free = (free_bytes if free_bytes is not None else available_host_bytes()) - 3 * param_bytes
    estimate = int(safety * free / max(per_sample, 1))
    return max(0, min(high, estimate)) if estimate >= low else 0

