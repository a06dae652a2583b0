"""Benchmark: when does asynchrony pay? Synchronous (s = 0), bounded (s = 2) and unbounded block updates, with and
without a straggler, in the real engine (wall time) and the simulator (virtual time).

    python bench/bench_async.py            # 4 blocks, one worker 4x slower, target training loss 0.5
    python bench/bench_async.py --quick    # a smoke run (few rounds): checks that it runs, numbers mean little

Every run trains the same model (an MLP with 4 blocks on the bundled digits, K local steps per update) from the
same seed with the same settings except ``max_staleness`` and ``worker_speeds``. Time to target = the first
progress record whose training loss is <= the target: its wall time (real engine, ``async``) or virtual time
(``async_sequential``, with ``--step_time`` measured once here and given to every simulator run, so their
schedules are comparable). The samples, block updates and optimiser steps spent until then are printed beside it:
the comparison is at equal target loss, not at equal compute. Baseline: s = 0 in the same invocation (the
synchronous Jacobi algorithm, bit for bit). Then, per bound, the largest stable step size (simulator, equal
speeds): the largest of the step sizes tried whose run ends finite and below half its initial loss.
Not a test: timings on shared machines are noisy; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BOUNDS = ((0, "synchronous (s = 0)"), (2, "s = 2"), (-1, "unbounded"))


def _run(mode: str, bound: int, speeds: list[float], args: argparse.Namespace, step_size: float | None = None,
         step_time: float = 0.0) -> list[dict]:
    import dol1
    with tempfile.TemporaryDirectory(prefix="bench_async_") as root, contextlib.redirect_stdout(io.StringIO()):
        frame = dol1.main(["--training_mode", mode, "--model", "mlp", "--config", args.config, "--dataset_name",
                           "digits_flat", "--batch_size", "128", "--K", str(args.K), "--rounds", str(args.rounds),
                           "--max_staleness", str(bound), "--worker_speeds", str(speeds), "--step_time",
                           str(step_time), "--step_size", str(step_size or args.step_size), "--cuda_core", "-1",
                           "--report_sampling_rate", "1", "--measurement_sampling_rate", "0", "--eval_samples",
                           "512", "--checkpoint_every", "0", "--output_root", root])
    return frame.history


def time_to_target(history: list[dict], target: float, clock: str) -> dict:
    """The first record at or below the target loss (None values when never reached)."""
    for record in history:
        if math.isfinite(record["loss"]) and record["loss"] <= target:
            return {"time": record[clock], "round": record["round"], "samples": record["samples"],
                    "block_updates": record.get("block_updates"), "steps": record["steps"]}
    return {"time": None, "round": None, "samples": None, "block_updates": None, "steps": None}


def step_time_of(args: argparse.Namespace) -> float:
    """Seconds per local step, measured once by the simulator (then given to every simulator run)."""
    return _run("async_sequential", 0, [], args)[-1]["step_time"]


def _fmt(value: float | None, digits: str = ".3g") -> str:
    return "not reached" if value is None else format(value, digits)


def comparison(args: argparse.Namespace, step_time: float) -> list[str]:
    lines = ["| speeds | engine | bound | time to target | vs synchronous | round | samples | block updates | "
             "steps | final loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for speeds in ([1, 1, 1, 4], [1, 1, 1, 1]):
        for mode, clock, unit in (("async", "wall_time", "s wall"), ("async_sequential", "virtual_time",
                                                                          "s virtual")):
            base = None
            for bound, name in BOUNDS:
                history = _run(mode, bound, speeds, args, step_time=step_time if mode != "async" else 0.0)
                hit = time_to_target(history, args.target, clock)
                base = hit["time"] if bound == 0 else base
                ratio = base / hit["time"] if base and hit["time"] else None
                lines.append(f"| {speeds} | {mode} | {name} | {_fmt(hit['time'])} {unit} | "
                             f"{_fmt(ratio, '.2f')}x | {hit['round']} | {hit['samples']} | {hit['block_updates']} | "
                             f"{hit['steps']} | {history[-1]['loss']:.3f} |")
                print(lines[-1], flush=True)
    return lines


def stability(args: argparse.Namespace, step_time: float) -> list[str]:
    lines = ["| bound | step sizes tried | largest stable | final loss per step size |", "|---|---|---|---|"]
    for bound, name in BOUNDS:
        finals, stable = [], []
        for lr in args.step_sizes:
            history = _run("async_sequential", bound, [1, 1, 1, 1], args, step_size=lr, step_time=step_time)
            finals.append(history[-1]["loss"])
            if math.isfinite(finals[-1]) and finals[-1] < 0.5 * history[0]["loss"]:  # trained, not just moved
                stable.append(lr)
        lines.append(f"| {name} | {args.step_sizes} | {max(stable) if stable else 'none'} | "
                     f"{[round(f, 3) if math.isfinite(f) else 'nan' for f in finals]} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 rounds, two step sizes")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--K", type=int, default=2)
    parser.add_argument("--config", default="[64, 64, 64]", help="hidden widths: 3 hidden layers = 4 blocks")
    parser.add_argument("--step_size", type=float, default=0.003)
    parser.add_argument("--target", type=float, default=0.5, help="training loss to reach")
    parser.add_argument("--step_sizes", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3])
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.step_sizes, args.target = 4, [0.01, 0.3], 2.2
    step_time = step_time_of(args)
    print(f"# bench_async: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads in this process, {datetime.now():%Y-%m-%d %H:%M}; config {args.config}, "
          f"K {args.K}, rounds {args.rounds}, step size {args.step_size}, target loss {args.target}, simulator "
          f"step_time {step_time:.3g} s\n")
    comparison(args, step_time)
    print()
    stability(args, step_time)


if __name__ == "__main__":
    main()
