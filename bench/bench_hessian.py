"""Benchmark: all-pairs Hessian block norms, naive power iteration vs dense Hessian vs batched Krylov.

Run by hand: ``python bench/bench_hessian.py`` (CPU, float64 MLP on digits) or
``python bench/bench_hessian.py --device cuda --model resnet18`` (float32 ResNet-18 in 10 blocks, random
CIFAR-sized batch; torchvision imported there only). Prints a markdown table with the machine and the date.

(a) naive: per pair, power iteration on H_ijᵀ H_ij, one HVP per autograd call with the graph rebuilt each time;
    per diagonal block, power iteration on H_ii. ``--power-steps`` steps each: 2·T·P + T·B HVPs.
(b) dense: ``exact_hessian`` then ``block_spectral_norms`` (N HVPs); the reference when it fits (MLP).
(c) ours: ``block_interaction_norms(method="krylov")`` at the given tol.
Errors are relative to (b); where (b) does not fit (ResNet-18) they are relative to the entrywise largest of all
estimates (all are lower bounds) and a tight-tolerance run of (c) is added to that reference.
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

from src.Buliding_Units.hessian import (block_interaction_norms, block_sizes, block_spectral_norms,  # noqa: E402
                                        exact_hessian, make_batched_hvp)


class Blocks(nn.Module):
    """Runs ``blocks`` in order."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


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
    model = Blocks(blocks + [nn.Linear(width, 10)]).to(device=device, dtype=torch.float64)
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
    model = Blocks([stem, *residual, head]).to(device).eval()
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


def relative_errors(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    upper = torch.triu_indices(*reference.shape)
    ref = reference[upper[0], upper[1]]
    keep = ref > 0
    return ((estimate[upper[0], upper[1]] - ref).abs() / ref)[keep]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--model", default="mlp", choices=["mlp", "resnet18"])
    parser.add_argument("--width", type=int, default=24, help="MLP hidden width")
    parser.add_argument("--depth", type=int, default=8, help="MLP hidden layers (blocks = depth + 1)")
    parser.add_argument("--batch", type=int, default=512, help="samples in the fixed batch")
    parser.add_argument("--train-steps", type=int, default=200, help="Adam steps before measuring (MLP)")
    parser.add_argument("--power-steps", type=int, default=80, help="steps of the naive power iteration")
    parser.add_argument("--tol", type=float, default=1e-2, help="tolerance of ours")
    parser.add_argument("--max-steps", type=int, default=50, help="max_steps of ours")
    parser.add_argument("--ref-steps", type=int, default=100, help="max_steps of the tol=1e-4 reference (ResNet)")
    parser.add_argument("--memory-mb", type=float, default=None,
                        help="memory_budget_mb of ours (default 256 on CPU, 8192 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory_mb = args.memory_mb or (8192 if device.type == "cuda" else 256)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start

    if args.model == "mlp":
        model, criterion, x, y = digits_mlp(device, args.width, args.depth, args.batch, args.train_steps, args.seed)
    else:
        model, criterion, x, y = resnet18_blocks(device, args.batch, args.seed)
    sizes = block_sizes(model)
    n_params, count = sum(sizes), len(sizes)
    make_batched_hvp(model, criterion, x, y)  # warm-up: the first torch.func call pays seconds of one-off set-up

    rows = {}
    (naive, naive_hvps), naive_time = timed(lambda: naive_power(model, criterion, x, y, args.power_steps, args.seed))
    rows[f"(a) naive power, {args.power_steps} steps/pair, graph per HVP"] = (naive, naive_hvps, naive_time)
    if args.model == "mlp":
        dense, dense_time = timed(lambda: block_spectral_norms(exact_hessian(model, criterion, x, y), sizes))
        rows["(b) dense exact Hessian + block SVDs"] = (dense, n_params, dense_time)
    (ours, info), ours_time = timed(lambda: block_interaction_norms(
        model, criterion, x, y, tol=args.tol, max_steps=args.max_steps, memory_budget_mb=memory_mb, method="krylov",
        return_info=True))
    rows[f"(c) ours, batched Golub-Kahan + pooled RR, tol={args.tol:g}"] = (ours, info.hvps, ours_time)
    if args.model == "mlp":
        reference = dense
    else:
        (tight, tight_info), tight_time = timed(lambda: block_interaction_norms(
            model, criterion, x, y, tol=1e-4, max_steps=args.ref_steps, memory_budget_mb=memory_mb, method="krylov",
            return_info=True))
        rows["(c') ours, tol=1e-4 (reference only)"] = (tight, tight_info.hvps, tight_time)
        reference = torch.stack([r[0] for r in rows.values()]).amax(0)

    print(f"# Hessian block norms benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}\n")
    print(f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"- model: {args.model}, {count} blocks, N = {n_params} parameters, {count * (count - 1) // 2} pairs, "
          f"batch {len(x)}, {next(model.parameters()).dtype}; ours: pool {info.pool}, {info.calls} batched calls, "
          f"{int(info.converged.sum())}/{count * count} entries converged")
    print("- errors relative to " + ("(b)" if args.model == "mlp" else "the entrywise max of all rows (lower bounds)")
          + ", over the B(B+1)/2 distinct entries\n")
    print("| method | HVPs | wall time s | max rel err | median rel err | HVPs (a)/this | time (a)/this |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (norms, hvps, seconds) in rows.items():
        errors = relative_errors(norms, reference)
        print(f"| {name} | {hvps} | {seconds:.2f} | {errors.max().item():.2e} | {errors.median().item():.2e} | "
              f"{naive_hvps / hvps:.1f} | {naive_time / seconds:.1f} |")


if __name__ == "__main__":
    main()
