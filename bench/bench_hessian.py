"""Benchmark: all-pairs Hessian block norms (naive power iteration vs dense vs ours) and the spectrum unit's cost.

Run by hand on a quiet machine: ``python bench/bench_hessian.py --threads 1`` (CPU, float64 MLP on digits; a ResNet-18
section follows when CUDA is available, else it prints why it is skipped); ``--quick`` for a smoke run. Prints
markdown tables with the machine and the date.

Block norms, errors relative to (b):
(a) naive: per pair, power iteration on H_ijᵀ H_ij, one HVP per autograd call with the graph rebuilt each time;
    per diagonal block, power iteration on H_ii. ``--power-steps`` steps each: 2·T·P + T·B HVPs.
(b) dense: ``exact_hessian`` then ``block_spectral_norms`` (N HVPs): the reference.
(c) ours, ``block_interaction_norms(method="krylov")`` at ``--tol``; (c*) ours at matched accuracy: the tolerance
    tightened (÷ √10 at a time) until our max error is at most (a)'s; the ratios of that row are the comparison.
Sharpness: λ_max by PyHessian-style power iteration (cached gradient graph, stop at relative change 1e-3, at most 100
steps) against ``curvature_spectrum`` (k = 1, which also gives the per-block λ_max and the traces), errors relative to
``eigvalsh`` of the dense Hessian.
ResNet-18 (CUDA only): float32, 10 blocks, all 45 pairs, random CIFAR-shaped batch: ours at ``--tol`` and at 1e-4;
no dense reference fits, so errors are relative to the entrywise largest estimate (all are lower bounds).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

if not __package__:  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.Architectures.feedforward_nn import BlockSequential  # noqa: E402
from src.Buliding_Units.hessian import (block_interaction_norms, block_sizes, block_spectral_norms,  # noqa: E402
                                        exact_hessian, make_batched_hvp)
from src.Buliding_Units.hessian.spectrum import curvature_spectrum  # noqa: E402


def digits_mlp(device: torch.device, width: int, depth: int, batch: int, train_steps: int, seed: int):
    """A float64 MLP 64 -> [width]*depth -> 10 (depth + 1 blocks), briefly trained on a fixed digits batch."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    data = load_digits()
    x = torch.tensor(data.data[:batch], dtype=torch.float64, device=device)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target[:batch], device=device)
    dims = [64] + [width] * depth
    blocks = [nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(dims[:-1], dims[1:])]
    model = BlockSequential(blocks + [nn.Linear(width, 10)]).to(device=device, dtype=torch.float64)
    criterion = nn.CrossEntropyLoss()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(train_steps):  # a Hessian from part-way through training, not from the initialisation
        optimiser.zero_grad()
        criterion(model(x), y).backward()
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return model.eval(), criterion, x, y


def resnet18_blocks(device: torch.device, batch: int, seed: int):
    """torchvision's ResNet-18 (10 classes, float32, eval) as 10 blocks: stem, 8 BasicBlocks, head."""
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=10)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    residual = [block for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for block in layer]
    head = nn.Sequential(net.avgpool, nn.Flatten(), net.fc)
    model = BlockSequential([stem, *residual, head]).to(device).eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, nn.CrossEntropyLoss(), x, y


def naive_power(model, criterion, x, y, steps: int, seed: int) -> tuple[torch.Tensor, int]:
    """Per-pair power iteration with one HVP per call and the graph rebuilt for every call."""
    params = [list(block.parameters()) for block in model.blocks]
    flat_params = [p for group in params for p in group]
    hvps = 0

    def hvp(block: int, vector: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        nonlocal hvps
        hvps += 1
        loss = criterion(model(x), y)
        grads = torch.autograd.grad(loss, flat_params, create_graph=True)
        start = sum(len(g) for g in params[:block])
        dot = sum((g * v).sum() for g, v in zip(grads[start:start + len(params[block])], vector))
        out = torch.autograd.grad(dot, flat_params)
        return [list(out[sum(len(g) for g in params[:b]):sum(len(g) for g in params[:b + 1])])
                for b in range(len(params))]

    def norm(vector):
        return torch.sqrt(sum((v * v).sum() for v in vector))

    generator = torch.Generator().manual_seed(seed)
    count = len(params)
    norms = torch.zeros(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(i, count):
            v = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) for p in params[j]]
            v = [t / norm(v) for t in v]
            for _ in range(steps):
                w = hvp(j, v)[i]  # H_ij v (for i == j: H_ii v)
                estimate = norm(w).item()
                if i != j:
                    w = hvp(i, [t / norm(w) for t in w])[j]  # H_ji w = H_ijᵀ w
                v = [t / norm(w) for t in w]
            norms[i, j] = norms[j, i] = estimate
    return norms, hvps


def pyhessian_power(model, criterion, x, y, max_steps: int = 100, tol: float = 1e-3, seed: int = 0):
    """λ_max as PyHessian computes it: power iteration on one cached gradient graph, stopping when the Rayleigh
    quotient changes by less than ``tol`` relative. Returns (λ, HVPs)."""
    params = [p for block in model.blocks for p in block.parameters()]
    grads = torch.autograd.grad(criterion(model(x), y), params, create_graph=True)
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    eigenvalue, hvps = None, 0
    for _ in range(max_steps):
        norm = torch.sqrt(sum((t * t).sum() for t in v))
        v = [t / norm for t in v]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        hvps += 1
        new = sum((a * b).sum() for a, b in zip(hv, v)).item()
        if eigenvalue is not None and abs(new - eigenvalue) / (abs(eigenvalue) + 1e-6) < tol:
            return new, hvps
        eigenvalue, v = new, list(hv)
    return eigenvalue, hvps


def relative_errors(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    upper = torch.triu_indices(*reference.shape)
    ref = reference[upper[0], upper[1]]
    keep = ref > 0
    return ((estimate[upper[0], upper[1]] - ref).abs() / ref)[keep]


def timer(device: torch.device):
    """``timed(fn) -> (fn(), seconds)``, synchronising CUDA around the call."""
    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start
    return timed


def ours(model, criterion, x, y, tol: float, args, timed):
    """((norms, info), seconds) of our Krylov block norms at ``tol``."""
    return timed(lambda: block_interaction_norms(model, criterion, x, y, tol=tol, max_steps=args.max_steps,
                                                 memory_budget_mb=args.memory_mb, method="krylov", return_info=True))


def matched_accuracy(model, criterion, x, y, target: float, reference, args, timed):
    """Ours at the loosest tolerance of the grid --tol × √10^n whose max error is at most ``target``:
    (tol, norms, info, seconds). Tightens from --tol while the error is above target, else loosens while it holds."""
    def run(tol):
        (norms, info), seconds = ours(model, criterion, x, y, tol, args, timed)
        return tol, norms, info, seconds, relative_errors(norms, reference).max().item() <= target

    *best, passed = run(args.tol)
    factor = 10 ** 0.5 if passed else 10 ** -0.5
    while best[0] * factor < 0.5 and best[0] * factor > 1e-10:
        *candidate, ok = run(best[0] * factor)
        if passed and not ok:
            break
        best, passed = candidate, ok
        if ok and factor < 1:
            break
    return tuple(best)


def print_table(rows: dict, reference: torch.Tensor, base: tuple[int, float]) -> None:
    print("| method | HVPs | wall time s | max rel err | median rel err | HVPs (a)/this | time (a)/this |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (norms, hvps, seconds) in rows.items():
        errors = relative_errors(norms, reference)
        print(f"| {name} | {hvps} | {seconds:.2f} | {errors.max().item():.2e} | {errors.median().item():.2e} | "
              f"{base[0] / hvps:.1f} | {base[1] / seconds:.1f} |")


def header(title: str, device: torch.device) -> None:
    print(f"# {title}, {datetime.datetime.now():%Y-%m-%d %H:%M}\n")
    print(f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))


def block_norm_section(model, criterion, x, y, args, timed) -> torch.Tensor:
    """Table 1: (a), (b), (c), (c*). Returns the dense Hessian."""
    sizes = block_sizes(model)
    (naive, naive_hvps), naive_time = timed(lambda: naive_power(model, criterion, x, y, args.power_steps, args.seed))
    H, dense_time = timed(lambda: exact_hessian(model, criterion, x, y))
    dense = block_spectral_norms(H, sizes)
    (norms, info), seconds = ours(model, criterion, x, y, args.tol, args, timed)
    naive_error = relative_errors(naive, dense).max().item()
    tol, matched, matched_info, matched_time = matched_accuracy(model, criterion, x, y, naive_error, dense, args,
                                                                timed)
    count = len(sizes)
    print(f"- model: MLP, {count} blocks, N = {sum(sizes)} parameters, {count * (count - 1) // 2} pairs, batch "
          f"{len(x)}, {next(model.parameters()).dtype}; ours at tol {args.tol:g}: pool {info.pool}, {info.calls} "
          f"batched calls, {int(info.converged.sum())}/{count * count} entries converged; errors relative to (b)\n")
    print_table({f"(a) naive power, {args.power_steps} steps/pair, graph per HVP": (naive, naive_hvps, naive_time),
                 "(b) dense exact Hessian + block SVDs": (dense, sum(sizes), dense_time),
                 f"(c) ours, tol={args.tol:g}": (norms, info.hvps, seconds),
                 f"(c*) ours at matched accuracy (max err <= (a)'s), tol={tol:.2g}":
                     (matched, matched_info.hvps, matched_time)}, dense, (naive_hvps, naive_time))
    return H


def spectrum_section(model, criterion, x, y, H, args, timed) -> None:
    """Table 2: λ_max by PyHessian-style power iteration against the spectrum unit's numerics."""
    exact = torch.linalg.eigvalsh(H)[-1].item()
    (power, power_hvps), power_time = timed(lambda: pyhessian_power(model, criterion, x, y, seed=args.seed))
    result, seconds = timed(lambda: curvature_spectrum(model, criterion, x, y, k=1, tol=args.spectrum_tol,
                                                       trace_probes=args.trace_probes, seed=args.seed))
    print(f"\n## Sharpness: λ_max = {exact:.6g} (eigvalsh of the dense Hessian)\n")
    print("| method | HVPs | wall time s | λ_max rel err | also gives |")
    print("|---|---:|---:|---:|---|")
    print(f"| PyHessian-style power iteration (tol 1e-3) | {power_hvps} | {power_time:.2f} | "
          f"{abs(power - exact) / abs(exact):.2e} | – |")
    print(f"| ours, spectrum (k=1, tol {args.spectrum_tol:g}, {args.trace_probes} trace probes) | {result.hvps} | "
          f"{seconds:.2f} | {abs(result.eigenvalues[0] - exact) / abs(exact):.2e} | per-block λ_max, traces ± SE |")


def resnet_section(args) -> None:
    """Table 3 (CUDA only): ResNet-18, all 45 pairs, ours at --tol and at 1e-4."""
    if not torch.cuda.is_available():
        print("\n## ResNet-18: skipped (CUDA is not available on this machine)")
        return
    device = torch.device(args.device if args.device.startswith("cuda") else "cuda")
    timed, memory_mb = timer(device), args.memory_mb or 8192
    model, criterion, x, y = resnet18_blocks(device, args.resnet_batch, args.seed)
    make_batched_hvp(model, criterion, x, y)  # warm-up
    rows = {}
    for tol in (args.tol, 1e-4):
        (norms, info), seconds = timed(lambda: block_interaction_norms(
            model, criterion, x, y, tol=tol, max_steps=args.ref_steps, memory_budget_mb=memory_mb, method="krylov",
            return_info=True))
        rows[f"ours, tol={tol:g} ({int(info.converged.sum())}/100 converged, {info.calls} calls)"] = (
            norms, info.hvps, seconds)
    reference = torch.stack([r[0] for r in rows.values()]).amax(0)
    print(f"\n## ResNet-18, {torch.cuda.get_device_name(device)}: 10 blocks, N = {sum(block_sizes(model))}, 45 pairs, "
          f"batch {len(x)}, float32; errors relative to the entrywise max of the rows (lower bounds)\n")
    first = next(iter(rows.values()))
    print_table(rows, reference, (first[1], first[2]))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device of the MLP tables, e.g. cpu or cuda")
    parser.add_argument("--width", type=int, default=24, help="MLP hidden width")
    parser.add_argument("--depth", type=int, default=8, help="MLP hidden layers (blocks = depth + 1)")
    parser.add_argument("--batch", type=int, default=512, help="samples in the fixed batch")
    parser.add_argument("--train-steps", type=int, default=200, help="Adam steps before measuring (MLP)")
    parser.add_argument("--power-steps", type=int, default=80, help="steps of the naive power iteration")
    parser.add_argument("--tol", type=float, default=1e-2, help="tolerance of ours (row c)")
    parser.add_argument("--max-steps", type=int, default=50, help="max_steps of ours")
    parser.add_argument("--spectrum-tol", type=float, default=1e-3, help="tol of the spectrum")
    parser.add_argument("--trace-probes", type=int, default=64, help="Hutchinson probes of the spectrum")
    parser.add_argument("--ref-steps", type=int, default=100, help="max_steps of ours on ResNet-18")
    parser.add_argument("--resnet-batch", type=int, default=128, help="batch of the ResNet-18 rows")
    parser.add_argument("--no-resnet", action="store_true", help="skip the ResNet-18 section even with CUDA")
    parser.add_argument("--memory-mb", type=float, default=None,
                        help="memory_budget_mb of ours (default 256 on CPU, 8192 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (no ResNet-18)")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.batch, args.train_steps, args.power_steps = 4, 2, 16, 2, 5
        args.trace_probes, args.no_resnet = 8, True
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    timed = timer(device)
    args.memory_mb = args.memory_mb or (8192 if device.type == "cuda" else 256)
    model, criterion, x, y = digits_mlp(device, args.width, args.depth, args.batch, args.train_steps, args.seed)
    make_batched_hvp(model, criterion, x, y)  # warm-up: the first torch.func call pays seconds of one-off set-up
    header("Hessian block norms benchmark", device)
    H = block_norm_section(model, criterion, x, y, args, timed)
    spectrum_section(model, criterion, x, y, H, args, timed)
    if args.no_resnet:
        print("\n## ResNet-18: skipped (--no-resnet or --quick)")
    else:
        args.memory_mb = None
        resnet_section(args)


if __name__ == "__main__":
    main()
