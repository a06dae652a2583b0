"""The data-parallel baseline: ``--training_mode entire`` under torchrun (world size 2, gloo, CPU) runs as
DistributedDataParallel on the rank's rows of the global batch and reproduces a single process with the global
batch (float64, to 1e-10); with world size 1 nothing changes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dol1
from src.cli import ConfigError
from src.Optimizer_Engines.parallel.ddp_engine import check_slurm_tasks, ddp_worker, shard, step_bytes

ROOT = Path(dol1.__file__).resolve().parent
ARGS = ["--model", "mlp", "--config", "[16]", "--dataset_name", "digits_flat", "--rounds", "8",
        "--report_sampling_rate", "4", "--measurement_sampling_rate", "0", "--cuda_core", "-1",
        "--batch_size", "33",  # 16 + 17 rows: uneven shards must still give the global batch's gradient
        "--training_mode", "tests.ddp_helpers.train_entire_float64"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # torchrun's ranks run one thread each


def files(root):
    (report,) = (Path(root) / "reports").glob("R*.txt")
    run = report.name.removesuffix(".txt")
    metrics = [json.loads(line) for line in (report.parent / f"{run}.metrics.jsonl").read_text().splitlines()]
    return report.read_text(), metrics, torch.load(report.parent / f"{run}.model.pt", weights_only=True)


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_with_the_global_batch(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "dol1.py"]
    out = subprocess.run(torchrun + ARGS + ["--output_root", str(tmp_path / "ddp")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    one = subprocess.run([sys.executable, "dol1.py"] + ARGS + ["--output_root", str(tmp_path / "one")], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    report, ddp, model = files(tmp_path / "ddp")  # one report: ranks > 0 write nothing
    _, single, reference = files(tmp_path / "one")
    assert "Data parallel: 2 ranks" in report and "max difference 0 (identical)" in report
    assert [r["round"] for r in ddp] == [r["round"] for r in single] == [0, 4, 8]
    for a, b in zip(ddp, single):
        for key in ("loss", "accuracy", "test_loss", "test_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=0, abs=1e-10), key
        assert (a["steps"], a["samples"]) == (b["steps"], b["samples"]) == (a["round"], 33 * a["round"])
    assert ddp[-1]["loss"] < ddp[0]["loss"] - 0.1  # it trained
    for key, value in reference.items():
        assert value.dtype == torch.float64 and torch.allclose(model[key], value, rtol=0, atol=1e-10), key
    grads = sum(v.numel() * 8 for v in reference.values())  # every tensor of the MLP is a parameter
    assert [r["bytes_sent"] for r in ddp] == [r * 2 * grads for r in (0, 4, 8)]  # ring all-reduce: 2(W-1) payloads
    assert [r["bytes_sent"] for r in single] == [0, 0, 0]


def test_world_size_one_changes_nothing(tmp_path, monkeypatch):
    args = ARGS[:-1] + ["entire"]
    plain = dol1.main(args + ["--output_root", str(tmp_path / "plain")])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # `torchrun --nproc_per_node 1`
    single = dol1.main(args + ["--output_root", str(tmp_path / "torchrun1")])
    assert not dist.is_initialized()
    timing = ("wall_time", "compute_time", "communication_time", "compute_time_share", "train_time", "measure_time",
              "eval_time")
    assert [{k: v for k, v in r.items() if k not in timing} for r in single.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in plain.history]
    assert "Data parallel" not in single.reporter.path.read_text()


@pytest.mark.parametrize("batch", [2, 7, 32, 33, 128])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_cover_the_batch_once(batch, world):
    rows = [list(range(batch))[shard(batch, r, world)] for r in range(world)]
    assert sum(rows, []) == list(range(batch))
    assert max(map(len, rows)) - min(map(len, rows)) <= 1


def test_step_bytes_counts_gradients_twice_and_buffers_once():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))  # 8 + 4 parameters, 5 buffers
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert step_bytes(model, 1) == 0
    assert step_bytes(model, 3) == 2 * 2 * 12 * 4 + 2 * buffers


def test_ddp_worker_is_for_ranks_above_zero(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="ranks > 0"):
        ddp_worker(dict(dol1.DEFAULTS))


@pytest.mark.parametrize("environ, refused", [
    ({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}, "SLURM_NTASKS=4"),  # srun -n 4 python dol1.py (older Slurm)
    ({"SLURM_NTASKS": "4", "SLURM_STEPID": "0"}, "SLURM_NTASKS=4"),
    ({"SLURM_NTASKS": "4"}, None),  # the batch script itself under sbatch --ntasks 4: one process
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_STEP_NUM_TASKS=2"),  # srun's own count first
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, None),  # srun --ntasks 1 inside a larger allocation
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "2", "RANK": "1", "WORLD_SIZE": "2"}, None),  # torchrun inside the job set the group up
    ({}, None),
])
def test_srun_with_several_tasks_but_no_torchrun_is_refused(environ, refused):
    if refused is None:
        check_slurm_tasks(environ)
        return
    with pytest.raises(ConfigError, match=refused) as info:
        check_slurm_tasks(environ)
    assert "torchrun" in str(info.value) and "srun --ntasks 1" in str(info.value)


def test_srun_refusal_exits_2_before_anything_is_written(tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    with pytest.raises(SystemExit) as info:
        dol1.main(ARGS[:-1] + ["entire", "--output_root", str(tmp_path)])
    assert info.value.code == 2
    assert "SLURM_NTASKS=2" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
