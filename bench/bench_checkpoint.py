"""Checkpoint benchmark (run by hand: ``python bench/bench_checkpoint.py``); prints a markdown table.

For each case, in one process: the time of a training round (median over ``--rounds`` rounds, after a warm-up), the
time to write one checkpoint (median of ``--repeats``), the time to read it back and restore a fresh frame, the file
size, and the overhead of the default cadence: write time / (``checkpoint_every`` × round time).

Cases: the default run (residual_cnn [16, 32, 32] on digits, block-wise sequential, batch 128) and ResNet-18 on
CIFAR-shaped 3×32×32 inputs (the bundled digits, so nothing is downloaded; block-wise sequential: 10 blocks, so
10 model copies and 10 block optimisers are in the checkpoint; batch 32 to keep a CPU round short).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import dol1  # noqa: E402
from src.Runs.checkpoint import Checkpointer, restore  # noqa: E402
from src.Optimizer_Engines.BCD_engine import blockwise_round  # noqa: E402

CASES = {
    "default run (residual_cnn [16,32,32], digits, batch 128)": [],
    "ResNet-18, 3x32x32 inputs, batch 32": ["--model", "ResNet18", "--batch_size", "32"],
}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {date.today().isoformat()}")


def measure(extra: list[str], rounds: int, repeats: int) -> dict[str, float]:
    """Round time, checkpoint write and restore times, file size for one case."""
    argv = ["--cuda_core", "-1", "--measurement_sampling_rate", "0", "--report_sampling_rate", "0", *extra]
    H = dol1.resolve_config(argv)
    spec = dol1.resolve_engine(H["training_mode"])
    frame = dol1.make_frame(H, spec)
    for replica in frame.distributed_models.values():
        replica.train()
    times = []
    for r in range(rounds + 1):  # round 0 warms up
        t0 = time.perf_counter()
        blockwise_round(frame, r)
        times.append(time.perf_counter() - t0)
        frame.round += 1
    with tempfile.TemporaryDirectory() as folder:
        checkpointer = Checkpointer(Path(folder), keep=repeats + 1)
        writes, paths = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            paths.append(checkpointer.save(frame))
            writes.append(time.perf_counter() - t0)
            frame.round += 1
        size = paths[-1].stat().st_size
        loads = []
        for _ in range(repeats):
            fresh = dol1.make_frame(H, spec)
            t0 = time.perf_counter()
            restore(fresh, Checkpointer.read(paths[-1]))
            loads.append(time.perf_counter() - t0)
    return {"round": statistics.median(times[1:]), "write": statistics.median(writes),
            "restore": statistics.median(loads), "size_mb": size / 2 ** 20, "every": H["checkpoint_every"],
            "rounds_total": H["rounds"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed training rounds per case")
    parser.add_argument("--repeats", type=int, default=3, help="checkpoint writes and restores per case")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--cases", default="all", help="'all' or 'default' (the default run only)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Checkpoint cost; {machine()}\n")
    print("| case | round s | checkpoint write s | restore s | file MB | default cadence | overhead at default "
          "cadence |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, extra in CASES.items():
        if args.cases == "default" and extra:
            continue
        m = measure(extra, args.rounds, args.repeats)
        overhead = m["write"] / (m["every"] * m["round"])
        print(f"| {name} | {m['round']:.4f} | {m['write']:.4f} | {m['restore']:.4f} | {m['size_mb']:.2f} | "
              f"every {m['every']} rounds | {100 * overhead:.2f} % |")


if __name__ == "__main__":
    main()
