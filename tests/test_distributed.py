"""The multi-process engine (``--training_mode blockwise``): equivalence with the sequential engine, torchrun,
failures and interrupts, and the worker plan.

Every spawned run costs several seconds on a small machine (interpreter + torch import + gloo rendezvous), so the
module runs six of them: two equivalence runs in-process, one under torchrun, three failure/interrupt runs as
subprocesses (a failing run may end its process with os._exit, which must not be pytest's).
"""
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dol1
from src.Buliding_Units.MeasurementUnit import MeasurementUnit
from src.Buliding_Units.Model_frames import COUNTERS
from src.Optimizer_Engines.loop import active_blocks
from src.Optimizer_Engines.parallel.worker_plan import TorchrunEnv, plan_workers, torchrun_env
from src.reporting import read_report

pytestmark = pytest.mark.slow

ROOT = Path(dol1.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent
COMMON = ["--measurement_sampling_rate", "0", "--cuda_core", "-1", "--rounds", "6", "--K", "2",
          "--report_sampling_rate", "3", "--batch_size", "32"]
MLP = ["--model", "mlp", "--config", "[16]", "--dataset_name", "digits_flat"]  # 2 blocks: one worker per block
CNN = ["--model", "cnn", "--config", "[4, 4, 4]", "--dataset_name", "digits", "--n_workers", "2",  # 4 blocks, BN
       "--gamma", "0.7", "--active_share", "0.75"]  # damping, and a seeded subset of 3 blocks per round
END_WITHIN_S = 30


class SlowUnit(MeasurementUnit):
    """Test plugin: writes ``marker`` and then sleeps, so a test can act while rank 0 is busy outside collectives."""

    def __init__(self, marker: str = "", seconds: float = 120.0):
        super().__init__()
        self.marker, self.seconds = marker, seconds

    def measure(self, frame):
        Path(self.marker).write_text("measuring")
        time.sleep(self.seconds)
        return {}


def run(mode, root, args):
    return dol1.main(["--training_mode", mode, "--output_root", str(root)] + COMMON + args)


def metrics(root):
    (path,) = (Path(root) / "reports").glob("R*.metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def only_report(root):
    (path,) = (Path(root) / "reports").glob("R*.txt")
    return path


def alive(pid):
    """True while ``pid`` is a live process (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def worker_pids(report_text):
    line = next(line for line in report_text.splitlines() if "Worker pids:" in line)
    return [int(part.split()[-1]) for part in line.split("Worker pids:")[1].split(",")]


def start_dol1(root, extra, env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]), **(env_extra or {})}
    argv = [sys.executable, str(ROOT / "dol1.py"), "--training_mode", "blockwise", "--output_root", str(root)]
    return subprocess.Popen(argv + COMMON + MLP + extra, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(predicate, timeout_s, proc):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"dol1 ended early:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


@contextlib.contextmanager
def reaped(proc):
    """Whatever the test body does, dol1's whole process group is gone afterwards."""
    try:
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def kill_worker(proc, pid):
    """SIGKILL one worker; dol1 must end within END_WITHIN_S. Returns its output."""
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    out, _ = proc.communicate(timeout=END_WITHIN_S)
    assert time.monotonic() - killed_at < END_WITHIN_S
    return out


def ctrl_c(proc):
    """What Ctrl-C does: SIGINT to the whole foreground process group. Returns dol1's output."""
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=END_WITHIN_S)
    return out


@pytest.fixture
def one_thread():
    """The spawned ranks run one thread each; the sequential reference must too, or Adam turns last-bit differences
    of a multi-threaded reduction into visible ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def spawned_mlp(tmp_path_factory):
    root = tmp_path_factory.mktemp("spawned_mlp")
    return root, run("blockwise", root, MLP)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_matches_sequential_engine(model, spawned_mlp, tmp_path, one_thread):
    import multiprocessing
    if model == "mlp":
        root, frame = spawned_mlp
    else:
        root, frame = tmp_path / "blockwise", run("blockwise", tmp_path / "blockwise", CNN)
    args = MLP if model == "mlp" else CNN
    reference = run("blockwise_sequential", tmp_path / "sequential", args)
    mine, theirs = frame.center_model.state_dict(), reference.center_model.state_dict()
    assert any("running_var" in k for k in mine) == (model == "cnn")  # BatchNorm statistics are compared too
    for key in theirs:
        assert torch.allclose(mine[key].double(), theirs[key].double(), rtol=0, atol=1e-5), key
    assert (frame.round, frame.steps, frame.samples) == (reference.round, reference.steps, reference.samples) \
        == (6, 6 * math.ceil(frame.H["active_share"] * frame.n_blocks) * 2, 6 * 2 * 32)
    for a, b in zip(frame.history, reference.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["deviation"] == pytest.approx(b["deviation"])
        assert {k: a[k] for k in COUNTERS} == {k: b[k] for k in COUNTERS}  # summed over ranks = sequential
    assert frame.forward_sample_passes == frame.steps * 32 and frame.block_updates * 2 == frame.steps  # K = 2
    # each round, every active block's parameters and buffers travel to the one other rank
    payload = [sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()))
               for block in frame.center_model.blocks]
    share = frame.H["active_share"]
    per_round = [sum(payload[b] for b in active_blocks(r, frame.n_blocks, share, 0)) for r in range(6)]
    assert frame.bytes_sent == sum(per_round) and (share == 1 or len(set(per_round)) > 1)
    assert frame.timers["compute"] > 0 and frame.timers["communication"] > 0
    text = only_report(root).read_text()
    assert read_report(only_report(root))["status"] == "finished"
    assert f"{sum(per_round) / 6:.0f} bytes per round" in text and "= 0 (identical)" in text  # same centre everywhere
    assert len(frame.distributed_models) == len(range(0, frame.n_blocks, 2))  # rank 0 keeps only its copies
    assert multiprocessing.active_children() == [] and not any(alive(p) for p in worker_pids(text))


def test_torchrun_matches_spawned_run(spawned_mlp, tmp_path):
    root, _ = spawned_mlp
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "dol1.py",
            "--training_mode", "blockwise", "--output_root", str(tmp_path)]
    out = subprocess.run(argv + COMMON + MLP, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(list((tmp_path / "reports").glob("R*.txt"))) == 1  # ranks > 0 write nothing
    assert "(torchrun)" in only_report(tmp_path).read_text()
    theirs, mine = metrics(tmp_path), metrics(root)
    assert [r["round"] for r in theirs] == [r["round"] for r in mine] == [0, 3, 6]
    for a, b in zip(theirs, mine):
        for key in ("loss", "accuracy", "test_loss", "test_accuracy", "deviation"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["bytes_sent"] == b["bytes_sent"]


def test_worker_that_raises_fails_the_run_with_its_traceback(tmp_path):
    proc = start_dol1(tmp_path, [], {"BLOCKWISE_TEST_FAIL_RANK": "1", "BLOCKWISE_TEST_FAIL_ROUND": "2"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    report = only_report(tmp_path)
    head, text = read_report(report), report.read_text()
    assert head["status"] == "failed" and "WorkerFailed" in head["status_detail"]
    assert "BLOCKWISE_TEST_FAIL_RANK test hook: rank 1 fails in round 2" in text and "in distributed_round" in text
    assert not any(alive(p) for p in worker_pids(text))


def test_killed_worker_ends_the_run_while_rank0_is_busy(tmp_path):
    marker = tmp_path / "measuring"
    units = tmp_path / "Units.txt"
    units.write_text(f"- test_distributed.SlowUnit marker='{marker}'\n")
    proc = start_dol1(tmp_path, ["--units_file", str(units), "--measurement_sampling_rate", "2", "--rounds", "50"])
    with reaped(proc):
        wait_for(marker.exists, 120, proc)  # rank 0 sleeps in a plugin: its main thread cannot notice anything
        (pid,) = worker_pids(only_report(tmp_path).read_text())
        out = kill_worker(proc, pid)
    assert proc.returncode != 0, out
    head = read_report(only_report(tmp_path))
    assert head["status"] == "failed" and "SIGKILL" in head["status_detail"], head
    assert not alive(pid) and not alive(proc.pid)


def test_ctrl_c_interrupts_every_process(tmp_path):
    proc = start_dol1(tmp_path, ["--rounds", "100000", "--communication_delay", "0.01"])
    with reaped(proc):
        wait_for(lambda: any("Round 3:" in p.read_text() for p in tmp_path.glob("reports/R*.txt")), 120, proc)
        pids = worker_pids(only_report(tmp_path).read_text())
        out = ctrl_c(proc)
    assert proc.returncode == 130, out
    assert read_report(only_report(tmp_path))["status"] == "interrupted"
    assert not any(alive(p) for p in pids)


# --------------------------------------------------------------------------------------------------------------------
# The plan (pure)
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_blocks, n_workers, n_gpus, n_cpus, n, backend, devices", [
    (2, 0, 0, 2, 2, "gloo", ("cpu", "cpu")),  # auto on the CPU: one per block
    (10, 0, 0, 4, 4, "gloo", ("cpu",) * 4),  # auto capped at the cores
    (3, 0, 0, 16, 3, "gloo", ("cpu",) * 3),  # never more ranks than blocks
    (4, 8, 0, 2, 4, "gloo", ("cpu",) * 4),
    (10, 0, 4, 16, 4, "nccl", ("cuda:0", "cuda:1", "cuda:2", "cuda:3")),  # auto with CUDA: one per GPU
    (4, 4, 2, 16, 4, "gloo", ("cuda:0", "cuda:1", "cuda:0", "cuda:1")),  # ranks share GPUs: NCCL would refuse
    (2, 1, 1, 16, 1, "nccl", ("cuda:0",)),
])
def test_plan_backend_and_devices(n_blocks, n_workers, n_gpus, n_cpus, n, backend, devices):
    plan = plan_workers(n_blocks, n_workers, n_gpus, n_cpus)
    assert (plan.n, plan.backend, plan.devices) == (n, backend, devices)
    assert plan.threads == max(1, n_cpus // n)


def test_plan_assigns_blocks_round_robin():
    plan = plan_workers(7, 3, 0, 3)
    assert plan.assignment == ((0, 3, 6), (1, 4), (2, 5))
    assert [plan.owner(b) for b in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert sorted(b for blocks in plan.assignment for b in blocks) == list(range(7))


def test_plan_under_torchrun_uses_world_size_and_local_ranks():
    # 2 machines x 2 processes, 2 GPUs each, --cuda_core 1: world size as given, NCCL, local rank i on GPU (1+i)%2
    plan = plan_workers(3, 4, 2, 8, first_gpu=1, procs_per_node=2)
    assert (plan.n, plan.backend, plan.threads) == (4, "nccl", 4)
    assert plan.devices == ("cuda:1", "cuda:0", "cuda:1", "cuda:0")
    assert plan.assignment == ((0,), (1,), (2,), ())  # a rank may own nothing; it still joins every collective
    assert plan_workers(3, 4, 1, 8, procs_per_node=2).backend == "gloo"


@pytest.mark.parametrize("bad", [dict(n_blocks=0, n_workers=1), dict(n_blocks=2, n_workers=-1)])
def test_plan_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="n_blocks|n_workers"):
        plan_workers(bad["n_blocks"], bad["n_workers"], 0, 2)


def test_torchrun_env():
    assert torchrun_env({}) is None
    assert torchrun_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) \
        == TorchrunEnv(3, 4, 1, 2)
