"""Benchmark: the multi-process engine against the sequential one, and the cost of a gloo broadcast.

    python bench/bench_distributed.py                  # default CNN and a wider one, K = 5, 2 workers
    python bench/bench_distributed.py --rounds 4 --configs "[[8, 8, 8, 8, 8]]"

Prints markdown tables with the machine and the date. Round times come from each run's last metrics record:
compute (for ``blockwise``: the slowest rank's), communication (the rest of the round) and wall time (which also
holds the two progress evaluations), divided by the rounds. Baselines are measured in the same invocation:
``blockwise_sequential`` with every core's threads, and with one thread (what each worker of a 2-worker run gets).
With CUDA, ``blockwise`` also runs with one worker per GPU. Not a test: timings on shared machines are noisy.
"""
from __future__ import annotations

import argparse
import ast
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BROADCAST_MB = (0.04, 0.4, 4.0)
_MODEL: dict[str, str] = {}  # model and dataset_name of the benchmarked runs, set by main


def _run(mode: str, config: list, rounds: int, K: int, extra: list[str]) -> dict:
    import dol1
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as root:
        frame = dol1.main(["--training_mode", mode, "--config", str(config), "--rounds", str(rounds), "--K", str(K),
                           "--model", _MODEL["model"], "--dataset_name", _MODEL["dataset_name"],
                           "--report_sampling_rate", "0", "--measurement_sampling_rate", "0",
                           "--output_root", root] + extra)
    last = frame.history[-1]
    return {"compute": last["compute_time"] / rounds, "communication": last["communication_time"] / rounds,
            "wall": last["wall_time"] / rounds, "loss": last["loss"], "blocks": frame.n_blocks,
            "params": sum(p.numel() for p in frame.center_model.parameters())}


def engine_rows(configs: list, rounds: int, K: int, workers: int) -> list[tuple[str, str, dict]]:
    """Run every engine variant on every config; (config, variant, timings) per run."""
    cores = torch.get_num_threads()
    cpu = ["--cuda_core", "-1"]
    variants = [(f"blockwise_sequential, {cores} threads", "blockwise_sequential", cores, cpu),
                ("blockwise_sequential, 1 thread", "blockwise_sequential", 1, cpu),
                (f"blockwise, {workers} workers", "blockwise", cores, cpu + ["--n_workers", str(workers)])]
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        variants += [("blockwise_sequential, cuda:0", "blockwise_sequential", cores, ["--cuda_core", "0"]),
                     (f"blockwise, {gpus} workers on {gpus} GPUs", "blockwise", cores,
                      ["--cuda_core", "0", "--n_workers", str(gpus)])]
    rows = []
    for config in configs:
        for name, mode, threads, extra in variants:
            torch.set_num_threads(threads)
            rows.append((str(config), name, _run(mode, config, rounds, K, extra)))
            torch.set_num_threads(cores)
    return rows


def _broadcast_peer(port: int, sizes: tuple[float, ...], repeats: int) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    for mb in sizes:
        t = torch.empty(int(mb * 2**20 / 4))
        for _ in range(repeats + 1):
            dist.broadcast(t, src=0)
    dist.destroy_process_group()


def broadcast_rows(repeats: int = 50) -> list[tuple[float, float]]:
    """Median milliseconds per gloo broadcast of float32 tensors of ``BROADCAST_MB`` MB (2**20 bytes), 2 ranks."""
    import multiprocessing as mp

    import torch.distributed as dist

    from src.Optimizer_Engines.parallel.worker_pool import free_port
    port = free_port()
    peer = mp.get_context("spawn").Process(target=_broadcast_peer, args=(port, BROADCAST_MB, repeats),
                                           daemon=True)
    peer.start()
    rows = []
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
        for mb in BROADCAST_MB:
            t = torch.randn(int(mb * 2**20 / 4))
            dist.broadcast(t, src=0)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                dist.broadcast(t, src=0)
                times.append(time.perf_counter() - start)
            rows.append((mb, sorted(times)[len(times) // 2] * 1e3))  # the median: robust to a busy machine
        dist.destroy_process_group()
    finally:
        peer.join(30)
        if peer.is_alive():
            peer.kill()
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the tables."""
    import dol1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--K", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default=dol1.DEFAULTS["model"])
    parser.add_argument("--dataset_name", default=dol1.DEFAULTS["dataset_name"])
    parser.add_argument("--configs", type=ast.literal_eval, default=[dol1.DEFAULTS["config"], [32] * 5],
                        help="list of configs of --model (default: dol1's default and a wider one)")
    args = parser.parse_args(argv)
    _MODEL.update(model=args.model, dataset_name=args.dataset_name)

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print(f"## bench_distributed — {datetime.now():%Y-%m-%d %H:%M}\n")
    print(f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"GPUs: {torch.cuda.device_count() if torch.cuda.is_available() else 0}, "
          f"load average at start {load[0]:.2f}\n")
    print(f"Model {args.model} on {args.dataset_name}, batch {dol1.DEFAULTS['batch_size']}, "
          f"K = {args.K}, {args.rounds} rounds; seconds per round.\n")
    rows = engine_rows(args.configs, args.rounds, args.K, args.workers)
    print("| config | blocks / params | engine | compute | communication | compute + comm. | wall | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    baseline: dict[str, float] = {}
    for config, name, r in rows:
        busy = r["compute"] + r["communication"]
        base = baseline.setdefault(config, busy)  # the first variant: sequential with every core
        print(f"| {config} | {r['blocks']} / {r['params']} | {name} | {r['compute']:.3f} | "
              f"{r['communication']:.4f} | {busy:.3f} | {r['wall']:.3f} | {base / busy:.2f}x |")
    print("\nspeed-up: (compute + communication) of the first row of the config / this row's.\n")
    print("| gloo broadcast, 2 ranks | median ms | ms per MB |")
    print("|---|---|---|")
    for mb, ms in broadcast_rows():
        print(f"| {mb:g} MB | {ms:.2f} | {ms / mb:.2f} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "")


if __name__ == "__main__":
    main()
