"""Benchmark: per-block spectral densities (stochastic Lanczos quadrature) with every block in each batched HVP call
(``BlockSpectrumDensity``'s numerics) against one block at a time, with identical probes and steps.

Run by hand on a quiet machine: ``python bench/bench_density.py --threads 1`` (CPU, float64; a briefly trained MLP on
digits and a tiny CNN on the 8×8 digit images); ``--quick`` for a smoke run. Prints a markdown table with the machine,
the date and the torch threads. Rows per model (the same Rademacher starts, m Lanczos steps with full
reorthogonalisation, the same batched HVP object built once):

(a) one block, one probe at a time: what per-block SLQ code does (m single products per probe and block);
(b) one block at a time, that block's P probes batched;
(c) all blocks at once: one batched call per Lanczos step holding every block's probes (the unit's numerics).

All three spend the same products, P·Σ_b min(m, n_b); they differ in batched calls: P·Σ_b m_b, Σ_b m_b and max_b m_b.
``max Ritz diff``: the largest difference of any Ritz value from (c)'s (the answers must agree to 1e-8).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

if not __package__:  # run as a script: make the repository root and this folder importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hessian import digits_mlp, header  # noqa: E402
from src.Architectures.feedforward_nn import BlockSequential  # noqa: E402
from src.Buliding_Units.hessian import block_sizes, make_batched_hvp  # noqa: E402
from src.Buliding_Units.hessian.density import block_slq, rademacher_starts  # noqa: E402

AGREEMENT = 1e-8  # largest Ritz value difference allowed between the three ways
COLUMNS = ("model", "method", "blocks", "parameters", "HVPs", "batched calls", "seconds", "time / (c)",
           "max Ritz diff vs (c)")


def digits_cnn(batch: int, channels: int, seed: int):
    """A float64 CNN on 8×8 digit images, eval mode: conv 3×3 → conv 3×3 + pool → linear head (3 blocks)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    data = load_digits()
    x = torch.tensor(data.images[:batch], dtype=torch.float64)[:, None] / 16
    y = torch.tensor(data.target[:batch])
    model = BlockSequential([nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.Tanh()),
                             nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                                           nn.Flatten()),
                             nn.Linear(channels * 16, 10)]).to(torch.float64).eval()
    return model, nn.CrossEntropyLoss(), x, y


def one_at_a_time(hvp, sizes, starts, steps, batch_probes: bool):
    """SLQ block after block ((b) with ``batch_probes``, else (a): also probe after probe), with the given starts.
    Returns (Ritz values per block (P, m_b), products, calls)."""
    values, hvps, calls = [], 0, 0
    for b, start in enumerate(starts):
        rows = [start] if batch_probes else [start[p:p + 1] for p in range(start.shape[0])]
        found = []
        for part in rows:
            only = [part if c == b else None for c in range(len(sizes))]
            result = block_slq(hvp, sizes, probes=part.shape[0], steps=steps, starts=only)
            found.append(result.ritz_values[b])
            hvps, calls = hvps + result.hvps, calls + result.calls
        values.append(torch.cat(found))
    return values, hvps, calls


def compare(name: str, model, criterion, x, y, args) -> list[list[str]]:
    """The three rows of one model; asserts the answers agree."""
    sizes = block_sizes(model)
    hvp = make_batched_hvp(model, criterion, x, y, memory_budget_mb=args.memory_mb)
    hvp(torch.zeros(1, sum(sizes), dtype=hvp.dtype))  # warm-up: torch.func's first call pays one-off set-up
    starts = rademacher_starts(sizes, args.probes, args.seed, hvp.dtype)
    print(f"- {name}: block sizes {sizes}; the batched HVP takes at most {hvp.chunk_size} rows per pass "
          f"(memory_budget_mb {args.memory_mb:g}); (c) sends {args.probes * len(sizes)} rows per call")

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    batched, t_c = timed(lambda: block_slq(hvp, sizes, probes=args.probes, steps=args.steps, starts=starts))
    rows = {}
    for label, probes_batched in (("(a) one block, one probe at a time", False),
                                  ("(b) one block at a time, probes batched", True)):
        (values, hvps, calls), seconds = timed(lambda: one_at_a_time(hvp, sizes, starts, args.steps, probes_batched))
        diff = max(float((v - w).abs().max()) for v, w in zip(values, batched.ritz_values))
        rows[label] = (hvps, calls, seconds, diff)
    rows["(c) all blocks at once (BlockSpectrumDensity)"] = (batched.hvps, batched.calls, t_c, 0.0)
    scale = max(float(v.abs().max()) for v in batched.ritz_values)
    worst = max(r[3] for r in rows.values())
    assert worst <= AGREEMENT * max(1.0, scale), f"{name}: Ritz values differ by {worst:.3g} between the ways"
    assert len({r[0] for r in rows.values()}) == 1, "the three ways must spend the same products"
    return [[name, label, str(len(sizes)), str(sum(sizes)), str(hvps), str(calls), f"{seconds:.2f}",
             f"{seconds / t_c:.1f}", f"{diff:.1e}"] for label, (hvps, calls, seconds, diff) in rows.items()]


def print_table(rows: list[list[str]]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=24, help="MLP hidden width")
    parser.add_argument("--depth", type=int, default=6, help="MLP hidden layers (blocks = depth + 1)")
    parser.add_argument("--batch", type=int, default=256, help="samples in the fixed batch")
    parser.add_argument("--train-steps", type=int, default=100, help="Adam steps before measuring (MLP)")
    parser.add_argument("--channels", type=int, default=6, help="CNN channels")
    parser.add_argument("--cnn-batch", type=int, default=64, help="samples in the CNN's fixed batch")
    parser.add_argument("--no-cnn", action="store_true", help="skip the tiny CNN")
    parser.add_argument("--probes", type=int, default=8, help="P, starting vectors per block")
    parser.add_argument("--steps", type=int, default=40, help="m, Lanczos steps")
    parser.add_argument("--memory-mb", type=float, default=256, help="memory_budget_mb of the batched HVP")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.batch, args.train_steps, args.channels, args.cnn_batch = 4, 2, 16, 2, 2, 16
        args.probes, args.steps = 2, 6
    return args


def main(argv: list[str] | None = None) -> list[list[str]]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    header("Per-block spectral densities: all blocks at once vs one block at a time", torch.device("cpu"))
    print(f"- SLQ: {args.probes} probes per block, {args.steps} Lanczos steps (capped by the block size), full "
          f"reorthogonalisation, float64, the same starts in every row; MLP 64 -> {args.width} x {args.depth} -> 10 "
          f"({args.train_steps} Adam steps), batch {args.batch}; CNN 1 -> {args.channels} -> {args.channels} channels "
          f"on 8x8 digits (not trained), batch {args.cnn_batch}\n")
    rows = compare("MLP", *digits_mlp(torch.device("cpu"), args.width, args.depth, args.batch, args.train_steps,
                                      args.seed), args)
    if not args.no_cnn:
        rows += compare("CNN", *digits_cnn(args.cnn_batch, args.channels, args.seed), args)
    print()
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
