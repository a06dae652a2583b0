"""Engine benchmarks (run by hand: ``python bench/bench_engines.py``); prints markdown tables with machine and date.

(a) ``train_entire`` steps per second against a bare PyTorch loop on the same model, data and optimiser.
(b) a block-local step (frozen other blocks, gradients for one block) against a naive step (full backward, then
    an optimiser over that block only), per block of the default CNN.
(c) where one round of the default block-wise run spends its time: compute, communication, logging, measurement.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    import torch
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {date.today().isoformat()}")


def bench_entire(steps: int, repeats: int) -> list[str]:
    import torch

    import dol1
    from src.Buliding_Units.Model_frames import generate_ModelFrame
    from src.Optimizer_Engines.BCD_engine import train_entire

    H = dol1.resolve_config(["--training_mode", "entire", "--rounds", str(steps), "--report_sampling_rate", "0",
                             "--measurement_sampling_rate", "0", "--cuda_core", "-1"])
    ours, bare = [], []

    def run_ours() -> None:
        frame = generate_ModelFrame(H)
        t0 = time.perf_counter()
        train_entire(frame)
        ours.append(time.perf_counter() - t0 - frame.timers["logging"])  # the two evaluations are not steps

    def run_bare() -> None:
        frame = generate_ModelFrame(H)
        model, stream, criterion = frame.center_model, frame.train_batches, frame.criterion
        optimizer = torch.optim.Adam(model.parameters(), lr=H["step_size"])
        model.train()
        t0 = time.perf_counter()
        for t in range(steps):
            x, y = stream[t]
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimizer.step()
        bare.append(time.perf_counter() - t0)

    for repeat in range(repeats + 1):  # the first pair warms up (allocator, kernels) and is dropped
        for fn in ((run_ours, run_bare) if repeat % 2 else (run_bare, run_ours)):  # alternate the order
            fn()
    ours, bare = ours[1:], bare[1:]
    o, b = steps / statistics.median(ours), steps / statistics.median(bare)
    return ["| engine | steps/s | ratio to bare loop |", "|---|---|---|",
            f"| bare PyTorch loop | {b:.1f} | 1.00 |", f"| train_entire | {o:.1f} | {o / b:.2f} |"]


def bench_block_step(steps: int) -> list[str]:
    import torch

    import dol1
    from src.Buliding_Units.Model_frames import generate_ModelFrame, make_optimizer
    from src.Optimizer_Engines.loop import local_steps

    H = dol1.resolve_config(["--model", "cnn", "--cuda_core", "-1"])
    frame = generate_ModelFrame(H)
    batches = [frame.train_batches[t] for t in range(steps)]
    rows = ["| block | naive full-backward step (ms) | block-local step (ms) | speed-up |", "|---|---|---|---|"]
    ratios = []
    for b in range(frame.n_blocks):
        local_model, local_opt = frame.distributed_models[b], frame.block_optimizers[b]
        naive_model = copy.deepcopy(frame.center_model)
        naive_opt = make_optimizer(naive_model.blocks[b].parameters(), H)

        def naive(model=naive_model, opt=naive_opt):
            for x, y in batches:
                opt.zero_grad(set_to_none=True)
                model.zero_grad(set_to_none=True)
                frame.criterion(model(x), y).backward()  # gradients for every block, used for one
                opt.step()

        def local(model=local_model, opt=local_opt):
            local_steps(model, opt, frame.criterion, batches)

        timings = {}
        for name, fn in (("naive", naive), ("local", local)):
            fn()  # warm-up
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                runs.append((time.perf_counter() - t0) / steps * 1e3)
            timings[name] = min(runs)
        ratios.append(timings["naive"] / timings["local"])
        rows.append(f"| {b} | {timings['naive']:.2f} | {timings['local']:.2f} | {ratios[-1]:.2f} |")
    rows.append(f"| mean | | | {statistics.mean(ratios):.2f} |")
    del torch
    return rows


def bench_round(rounds: int, units_file: str = "") -> list[str]:
    import tempfile

    import dol1

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        frame = dol1.main(["--rounds", str(rounds), "--output_root", out, "--cuda_core", "-1",
                           "--measurement_sampling_rate", str(max(1, rounds // 2)), "--units_file", units_file])
        total = time.perf_counter() - t0
    timers = frame.timers
    rows = [f"Default run ({frame.H['model']} {frame.H['config']}, {frame.n_blocks} blocks, K = {frame.H['K']}, "
            f"{rounds} rounds, progress every {frame.H['report_sampling_rate']} rounds, units: "
            f"{[type(u).__name__ for u in frame.measure_units]}, measured at round {max(1, rounds // 2)} and at "
            f"the end):", "", "| part | seconds per round | share of the run |", "|---|---|---|"]
    parts = {part: timers[part] for part in ("compute", "communication", "logging", "measurement")}
    parts["other (start-up, data, figures)"] = total - sum(parts.values())
    for part, seconds in parts.items():
        rows.append(f"| {part} | {seconds / rounds:.4f} | {seconds / total:.1%} |")
    rows.append(f"| whole run | {total / rounds:.4f} | 100% |")
    return rows


SCHEDULES = ("- LearningRateSchedule scheduler=CosineAnnealingLR",
             "- ParameterSchedule key=gamma shape=cosine start=1.0 end=0.8",
             "- ParameterSchedule key=active_share values=[[0,1.0]]",
             "- Curriculum score=file score_file={scores} pacing=linear start=0.2 full_at={half}")


def bench_schedules(rounds: int, repeats: int) -> list[str]:
    """(d) Per-round cost of three schedules and a curriculum against none, on the default run (equal work: the
    schedules change the learning rate, the damping and the pool, not the number of steps or samples)."""
    import tempfile

    import dol1

    per_round: dict[str, list[float]] = {"none": [], "3 schedules + curriculum": []}
    shares = []
    with tempfile.TemporaryDirectory() as out:
        units = {"none": Path(out) / "none.txt", "3 schedules + curriculum": Path(out) / "schedules.txt"}
        units["none"].write_text("# nothing\n")
        import numpy as np
        np.save(Path(out) / "scores.npy", np.random.default_rng(0).random(1438))  # digits' training split
        units["3 schedules + curriculum"].write_text(
            "\n".join(SCHEDULES).format(half=rounds // 2, scores=Path(out) / "scores.npy") + "\n")
        for repeat in range(repeats):
            for name in (per_round if repeat % 2 else reversed(list(per_round))):  # alternate the order
                frame = dol1.main(["--rounds", str(rounds), "--output_root", f"{out}/{name}{repeat}", "--cuda_core",
                                   "-1", "--measurement_sampling_rate", "0", "--report_sampling_rate", "0",
                                   "--checkpoint_every", "0", "--units_file", str(units[name])])
                t = frame.timers
                per_round[name].append((t["compute"] + t["communication"] + t.get("schedules", 0.0)) / rounds)
                if name != "none":
                    shares.append(t["schedules"] / (t["compute"] + t["communication"] + t["schedules"]))
    base, scheduled = (statistics.median(v) for v in per_round.values())
    return [f"Default run, {rounds} rounds, median of {repeats} (order alternated); the curriculum reads its "
            f"scores from a file (scoring by the model costs one forward pass over the training set per scoring):",
            "",
            "| units | seconds per round (compute + communication + schedules) | ratio to none |", "|---|---:|---:|",
            f"| none | {base:.4f} | 1.000 |", f"| 3 schedules + curriculum | {scheduled:.4f} | {scheduled / base:.3f} |",
            "", f"Time inside the schedules themselves: {100 * statistics.median(shares):.2f} % of the round."]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=40, help="rounds of the default run in (c)")
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}\n")
    print("(a) train_entire against a bare loop (default model and data, Adam)\n")
    print("\n".join(bench_entire(args.steps, args.repeats)) + "\n")
    print("(b) block-local step against a naive full-backward step (cnn, default config)\n")
    print("\n".join(bench_block_step(max(5, args.steps // 4))) + "\n")
    print("(c) one round of the default block-wise run\n")
    print("\n".join(bench_round(args.rounds)) + "\n")
    print("(d) schedules and a curriculum against none\n")
    print("\n".join(bench_schedules(args.rounds, args.repeats)))


if __name__ == "__main__":
    main()
