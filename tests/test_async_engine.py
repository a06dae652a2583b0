"""The real asynchronous engine (``--training_mode async``): Jacobi bit for bit at s = 0, the staleness bound, no
lost update, real stragglers, worker failure and Ctrl-C. Every run spawns a server and its workers (seconds each)."""
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dol1
from src.Optimizer_Engines.parallel.async_book import staleness_limit
from src.Optimizer_Engines.parallel.async_transport import make_plan
from src.reporting import read_report
from test_async import BN_CNN, TINY, assert_bit_identical, frame_for, train
from test_distributed import alive, ctrl_c, kill_worker, only_report, reaped, wait_for, worker_pids

pytestmark = pytest.mark.slow

ROOT = Path(dol1.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("argv", [TINY, BN_CNN], ids=["mlp", "batchnorm_cnn"])
def test_bound_zero_is_jacobi_bit_for_bit(argv):
    threads = make_plan(frame_for(*argv, "--training_mode", "async")).threads
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # bit-identity holds at equal threads per process
    try:
        jacobi = train(*argv, "--training_mode", "blockwise_sequential")
    finally:
        torch.set_num_threads(before)
    real = train(*argv, "--training_mode", "async", "--max_staleness", "0")
    assert_bit_identical(jacobi, real)
    record = real.history[-1]
    assert record["staleness_max"] <= staleness_limit(0, real.n_blocks) and record["clock_gap_max"] == 0
    assert record["updates_per_block"] == [real.round] * real.n_blocks and record["updates_in_flight"] == 0
    assert multiprocessing.active_children() == []


def test_a_straggler_is_not_waited_for_and_the_bound_holds():
    """One worker 4x slower: unbounded, the fast worker applies about 4x as many updates; bounded by s = 1, nobody
    runs more than one update ahead. Compute dominates: K = 4 local steps of a wider MLP on 256 samples; two workers,
    so that the processes do not outnumber the cores of a small machine by much."""
    wide = [*TINY, "--config", "[256]", "--batch_size", "256", "--K", "4", "--rounds", "15",
            "--worker_speeds", "[1, 4]"]
    free = train(*wide, "--training_mode", "async").history[-1]
    fast, slow = free["worker_updates"][:1], free["worker_updates"][1]
    # 4x in theory; the server's turn-around and 3 processes on 2 cores take some of it (2.3x measured on a quiet
    # 2-core machine): what must hold is that the fast worker never waits for the slow one
    assert slow >= 1 and min(fast) / slow >= 2, free["worker_updates"]
    assert sum(free["updates_per_block"]) == free["block_updates"] >= 30  # every pushed update applied once
    bounded = train(*wide, "--training_mode", "async", "--max_staleness", "1").history[-1]
    assert bounded["clock_gap_max"] <= 1 and bounded["staleness_max"] <= staleness_limit(1, 2)
    assert max(bounded["worker_updates"]) - min(bounded["worker_updates"]) <= 2
    assert free["staleness_mean"] > 0 and free["worker_wait_time"][0] < free["worker_compute_time"][1]


def start_dol1(root, extra, env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]), **(env_extra or {})}
    argv = [sys.executable, str(ROOT / "dol1.py"), "--training_mode", "async", "--output_root", str(root),
            "--model", "mlp", "--config", "[16]", "--dataset_name", "digits_flat", "--batch_size", "32",
            "--cuda_core", "-1", "--measurement_sampling_rate", "0", "--report_sampling_rate", "3", "--rounds", "6"]
    return subprocess.Popen(argv + extra, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_worker_that_raises_fails_the_run_with_its_traceback(tmp_path):
    proc = start_dol1(tmp_path, [], {"BLOCKWISE_TEST_FAIL_RANK": "2", "BLOCKWISE_TEST_FAIL_ROUND": "2"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    report = only_report(tmp_path)
    head, text = read_report(report), report.read_text()
    assert head["status"] == "failed" and "WorkerFailed" in head["status_detail"], head
    assert "rank 2 fails in its update 2" in text and "in worker_loop" in text
    assert not any(alive(p) for p in worker_pids(text))


def test_killed_worker_ends_the_run(tmp_path):
    proc = start_dol1(tmp_path, ["--rounds", "100000", "--communication_delay", "0.01"])
    with reaped(proc):
        wait_for(lambda: any("Round 3:" in p.read_text() for p in tmp_path.glob("reports/R*.txt")), 120, proc)
        out = kill_worker(proc, worker_pids(only_report(tmp_path).read_text())[0])
    assert proc.returncode != 0, out
    head = read_report(only_report(tmp_path))
    assert head["status"] == "failed" and "SIGKILL" in head["status_detail"], head


def test_ctrl_c_interrupts_every_process(tmp_path):
    proc = start_dol1(tmp_path, ["--rounds", "100000", "--worker_speeds", "[1, 3]", "--checkpoint_every", "50"])
    with reaped(proc):
        wait_for(lambda: any("Round 3:" in p.read_text() for p in tmp_path.glob("reports/R*.txt")), 120, proc)
        pids = worker_pids(only_report(tmp_path).read_text())
        out = ctrl_c(proc)
    assert proc.returncode == 130, out
    head = read_report(only_report(tmp_path))
    assert head["status"] == "interrupted" and "resumable" in head["status_detail"], head
    assert not any(alive(p) for p in pids)


def test_torchrun_matches_the_spawned_run(tmp_path):
    """Under torchrun rank 0 serves and the other ranks are the workers; at s = 0 the run is the spawned one's."""
    common = ["--model", "mlp", "--config", "[16]", "--dataset_name", "digits_flat", "--batch_size", "32",
              "--cuda_core", "-1", "--measurement_sampling_rate", "0", "--report_sampling_rate", "3", "--rounds", "6",
              "--K", "2", "--max_staleness", "0", "--training_mode", "async"]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", "dol1.py",
            "--output_root", str(tmp_path / "torchrun")]
    out = subprocess.run(argv + common, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    report = only_report(tmp_path / "torchrun")
    assert "(torchrun, gloo)" in report.read_text()
    spawned = dol1.main(common + ["--output_root", str(tmp_path / "spawned")])
    import json
    (metrics,) = (tmp_path / "torchrun" / "reports").glob("R*.metrics.jsonl")
    theirs = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in theirs] == [r["round"] for r in spawned.history] == [0, 3, 6]
    for a, b in zip(theirs, spawned.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["worker_updates"] == b["worker_updates"]
