"""Smoke runs of the benchmark scripts with tiny settings: they run, print their tables, and the ratios are sane."""
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_engines  # noqa: E402
import bench_hessian  # noqa: E402


def test_bench_hessian_smoke(capsys):
    bench_hessian.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    assert "naive power" in out and "dense exact" in out and "ours" in out
    assert re.search(r"\| \(c\) ours.*\|", out)
    matched = re.search(r"\| \(c\*\) ours at matched accuracy.*", out).group(0).split("|")
    naive = re.search(r"\| \(a\) naive power.*", out).group(0).split("|")
    assert float(matched[4]) <= float(naive[4])  # the matched row's max error is at most the naive one's
    assert "PyHessian-style power iteration" in out and "ours, spectrum" in out
    assert "ResNet-18: skipped" in out


def test_bench_engines_tables():
    entire = bench_engines.bench_entire(steps=3, repeats=1)
    assert entire[2].startswith("| bare PyTorch loop") and entire[3].startswith("| train_entire")
    ratio = float(entire[3].split("|")[3])
    assert 0.2 < ratio < 5  # a smoke bound: both loops did the same work
    block = bench_engines.bench_block_step(steps=2)
    assert block[-1].startswith("| mean") and len(block) == 2 + 4 + 1  # header, 4 blocks of the default cnn, mean


def test_bench_engines_round_breakdown(tmp_path):
    units = tmp_path / "Units.txt"
    units.write_text("- Working_memory_usage\n")  # the default Hessian unit would dominate a smoke run
    rows = bench_engines.bench_round(rounds=2, units_file=str(units))
    parts = {r.split("|")[1].strip(): r for r in rows if r.startswith("| ")}
    assert {"compute", "communication", "logging", "measurement", "whole run"} <= set(parts)


def test_bench_checkpoint_smoke(capsys):
    import bench_checkpoint
    bench_checkpoint.main(["--rounds", "1", "--repeats", "1", "--cases", "default"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| default run")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert float(cells[1]) > 0 and float(cells[2]) > 0 and float(cells[4]) > 0 and cells[6].endswith("%")


def test_bench_engines_schedule_row():
    rows = bench_engines.bench_schedules(rounds=2, repeats=1)
    table = {r.split("|")[1].strip(): r for r in rows if r.startswith("| ") and "---" not in r}
    assert {"none", "3 schedules + curriculum"} <= set(table)
    assert 0.2 < float(table["3 schedules + curriculum"].split("|")[3]) < 5 and "%" in rows[-1]


def test_bench_async_pieces():
    import argparse

    import bench_async
    history = [{"loss": 2.3, "wall_time": 0.1, "round": 0, "samples": 0, "steps": 0},
               {"loss": float("nan"), "wall_time": 0.2, "round": 1, "samples": 10, "steps": 4},
               {"loss": 0.4, "wall_time": 0.3, "round": 2, "samples": 20, "steps": 8, "block_updates": 8}]
    assert bench_async.time_to_target(history, 0.5, "wall_time") == {
        "time": 0.3, "round": 2, "samples": 20, "block_updates": 8, "steps": 8}
    assert bench_async.time_to_target(history[:2], 0.5, "wall_time")["time"] is None
    args = argparse.Namespace(config="[8, 8, 8]", K=1, rounds=2, step_size=0.01)
    run = bench_async._run("async_sequential", 2, [1, 1, 1, 4], args, step_time=1.0)
    assert run[-1]["virtual_time"] > 0 and run[-1]["round"] == 2


@pytest.mark.slow
def test_bench_heterogeneity_smoke(tmp_path, capsys):
    import bench_heterogeneity
    bench_heterogeneity.main(["--quick", "--models", "mlp", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| mlp |" in out and "gap SGD − Adam" in out and (tmp_path / "heterogeneity.png").stat().st_size > 0
    row = json.loads((tmp_path / "heterogeneity.json").read_text())["rows"][0]
    assert 0 <= row["js0_init"][0] <= 1 and len(row["gap"]) == 1
