"""The launcher seam: attempt tokens, GPU placement and thread caps, the SLURM launcher's command lines (sbatch
rendered by submitit, a fake SLURM on PATH) and bad input. No SLURM here: the real submitit jobs of
``--launcher submitit_local`` are in tests/test_submitit_sweeps.py.
"""
import json
import os
import stat
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import master
from src import Sweeps as sweep
from src.Optimizer_Engines.parallel import distributed_engine, worker_pool
from src.Optimizer_Engines.parallel.worker_plan import plan_workers
from src.reporting import ATTEMPT_ENV, Reporter, read_report
from src.Sweeps import launchers, slurm

PROJECT = Path(master.__file__).resolve().parent


def tiny(out: Path, **extra) -> dict:
    return {"model": "mlp", "config": [16], "dataset_name": "digits_flat", "rounds": 20, "report_sampling_rate": 5,
            "measurement_sampling_rate": 0, "batch_size": 64, "eval_samples": 256, "output_root": str(out), **extra}


def argv(tmp_path: Path, *more: str, grid: dict | None = None) -> list[str]:
    return ["--grid", json.dumps(grid or {"step_size": [1e-3, 1e-2]}), "--fixed", json.dumps(tiny(tmp_path / "out")),
            "--tracker", str(tmp_path / "tracker.json"), "--cpu", "--cpu_slots", "2", *more]


# --- placement ------------------------------------------------------------------------------------------------------
def test_gpus_per_run_groups_the_gpus_and_caps_threads_per_run():
    slots = launchers.plan_slots(["0", "1", "2", "3", "4"], runs_per_gpu=2, cpu_slots=3, cores=16, gpus_per_run=2)
    assert [s.device for s in slots] == ["cuda:0,1", "cuda:2,3", "cuda:0,1", "cuda:2,3"]  # GPU 4 left over
    assert dict(slots[1].env) == {"CUDA_VISIBLE_DEVICES": "2,3", "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    assert dict(launchers.plan_slots(["0"], 1, 1, 16, cpus_per_run=3)[0].env)["OMP_NUM_THREADS"] == "3"
    with pytest.raises(ValueError, match="--gpus_per_run 3: must be between 1 and the 2 visible"):
        launchers.plan_slots(["0", "1"], 1, 1, 16, gpus_per_run=3)
    assert [s.device for s in launchers.plan_slots([], 1, 2, 16, gpus_per_run=4)] == ["cpu", "cpu"]  # no GPU: CPU


def test_a_multi_process_run_gets_one_nccl_worker_per_gpu_of_its_slot(monkeypatch):
    """8 slots of 2 GPUs on 16 mocked GPUs and 16 cores: each run 2 NCCL ranks with 1 thread each (not 8)."""
    monkeypatch.setattr(worker_pool, "available_cpus", lambda: 16)
    slots = launchers.plan_slots([str(i) for i in range(16)], runs_per_gpu=1, cpu_slots=1, cores=16, gpus_per_run=2)
    assert len(slots) == 8
    env = dict(slots[3].env)
    plan = plan_workers(n_blocks=3, n_workers=0, n_gpus=len(env["CUDA_VISIBLE_DEVICES"].split(",")),
                        n_cpus=worker_pool.thread_budget(env))
    assert (plan.n, plan.backend, plan.devices, plan.threads) == (2, "nccl", ("cuda:0", "cuda:1"), 1)


@pytest.mark.parametrize("omp, n_workers, expected", [
    ("2", 4, (4, 1)),  # 4 asked-for workers share a cap of 2 threads: 1 each (was 16 // 4 = 4 each)
    ("8", 4, (4, 2)),
    ("2", 0, (2, 1)),  # automatic: as many workers as the cap allows
    (None, 4, (4, 4)),  # no cap: the cores
    ("junk", 4, (4, 4)),
])
def test_spawned_workers_share_the_slot_thread_cap(monkeypatch, omp, n_workers, expected):
    monkeypatch.setattr(worker_pool, "available_cpus", lambda: 16)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    frame = SimpleNamespace(n_blocks=8, H={"n_workers": n_workers}, device=torch.device("cpu"), log=lambda _: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the automatic count's note: tested below
        plan = distributed_engine._plan(frame, None)
    assert (plan.n, plan.threads) == expected


def test_an_automatic_worker_count_held_down_by_omp_num_threads_says_so(monkeypatch):
    """OMP_NUM_THREADS=1 (a common cluster default) makes n_workers 0 a single process: the report and a warning
    say why and how to ask for more; without the cap nothing is said."""
    monkeypatch.setattr(worker_pool, "available_cpus", lambda: 16)
    logged = []
    frame = SimpleNamespace(n_blocks=8, H={"n_workers": 0}, device=torch.device("cpu"), log=logged.append)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.warns(UserWarning, match=r"OMP_NUM_THREADS=1 below the 16 cores; give --n_workers N"):
        assert distributed_engine._plan(frame, None).n == 1
    assert len(logged) == 1 and "1 worker process(es)" in logged[0]
    monkeypatch.delenv("OMP_NUM_THREADS")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert distributed_engine._plan(frame, None).n == 8
    assert len(logged) == 1


def test_async_workers_share_the_slot_thread_cap_too(monkeypatch):
    """8 slots x 4 async workers on 16 cores: 1 thread per worker (the slot's cap of 2 shared), not 16 // 4 each."""
    from src.Optimizer_Engines.parallel import async_transport
    monkeypatch.setattr(worker_pool, "available_cpus", lambda: 16)
    monkeypatch.setattr(async_transport, "available_cpus", lambda: 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    frame = SimpleNamespace(n_blocks=4, H={"n_workers": 4, "worker_speeds": []}, device=torch.device("cpu"))
    assert async_transport.make_plan(frame).threads == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert async_transport.make_plan(frame).threads == 4  # no cap: the cores


# --- the attempt token ----------------------------------------------------------------------------------------------
def test_the_token_is_written_in_status_and_report_and_kept_on_resume(tmp_path):
    reporter = Reporter({"a": 1}, tmp_path, run="Rtoken001", attempt="Rtoken001.1.abc")
    assert json.loads(reporter.status_path.read_text())["attempt"] == "Rtoken001.1.abc"
    assert "Attempt: Rtoken001.1.abc" in reporter.path.read_text()
    reporter.finish("interrupted", "SIGTERM")
    assert read_report(reporter.path)["attempt"] == "Rtoken001.1.abc"
    resumed = Reporter({"a": 1}, tmp_path, run="Rtoken001", resume=True, attempt="Rtoken001.2.def")
    resumed.finish()
    assert read_report(resumed.path)["attempt"] == "Rtoken001.2.def" and "Attempt: Rtoken001.2.def" in \
        resumed.path.read_text()
    assert read_report(Reporter({"b": 1}, tmp_path, run="Rtoken002").path)["attempt"] is None  # not in a sweep


def scheduler_with_report(tmp_path: Path, attempt: str | None, status: str = "finished"):
    run = sweep.Run("Rjudge001", {}, {}, [], {"rounds": 1}, tmp_path / "reports")
    reporter = Reporter({"a": 1}, run.reports_dir, run=run.run_id, attempt=attempt)
    reporter.finish(status)
    scheduler = sweep.Scheduler([run], [], tmp_path / "tracker.json", {"id": "S0", "grid": {}, "fixed": {}})
    return scheduler, run


@pytest.mark.parametrize("report_token, entry, outcome", [
    ("Rjudge001.1.aa", {"token": "Rjudge001.1.aa", "pid": None, "job_id": "4242"}, "done"),  # a job elsewhere
    ("Rjudge001.1.aa", {"token": "Rjudge001.2.bb", "pid": None, "job_id": "4243"}, "failed"),  # an older attempt
    ("Rjudge001.1.aa", {"token": "Rjudge001.2.bb", "pid": None, "job_id": None}, "interrupted"),  # never started
    (None, {"token": None, "pid": os.getpid(), "job_id": None}, "done"),  # adopted without a token: its pid
])
def test_an_attempt_is_judged_by_its_token_not_its_pid(tmp_path, report_token, entry, outcome):
    scheduler, run = scheduler_with_report(tmp_path, report_token)
    assert scheduler._from_report(run, dict(entry), since=0.0) == outcome


def test_local_launcher_finds_a_run_by_the_token_in_its_environment(tmp_path):
    command = (sys.executable, "-c", "import time; time.sleep(60)", "not-the-sweep's-command")
    launcher = launchers.LocalLauncher()
    handle = launcher.start(command, {ATTEMPT_ENV: "Rfind0001.1.ab"}, tmp_path / "log")
    try:
        found = launcher.find("Rfind0001", (sys.executable, "dol1.py", "--other"))
        assert found is not None and (found.pid, found.token) == (handle.pid, "Rfind0001.1.ab")
        assert launcher.poll(found) and launcher.find("Rfind0002", ("x", "y")) is None
    finally:
        launcher.kill(handle)
        handle.process.wait()
    assert not launcher.poll(found)


def test_a_multi_gpu_block_parallel_run_is_one_torchrun_on_slurm(tmp_path):
    run = sweep.Run("Rtr000001", {}, {}, ["--training_mode=blockwise"], {"training_mode": "blockwise"}, tmp_path)
    scheduler = sweep.Scheduler([run], [], tmp_path / "t.json", {"id": "S0", "grid": {}, "fixed": {}},
                                dol1=Path("dol1.py"), python="py", torchrun_procs=lambda r: 4)
    assert scheduler.command(run) == ["py", "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                                      "--nproc_per_node=4", "dol1.py", "--training_mode=blockwise"]
    args = master.build_parser().parse_args(["--launcher", "slurm", "--gpus_per_run", "4"])
    procs = master.torchrun_procs(args)
    # entire runs data-parallel under torchrun (one process per GPU); a single-process engine gets one process
    assert procs(run) == 4 and procs(sweep.Run("R2", {}, {}, [], {"training_mode": "entire"}, tmp_path)) == 4
    assert procs(sweep.Run("R3", {}, {}, [], {"training_mode": "blockwise_sequential"}, tmp_path)) == 1
    assert master.torchrun_procs(master.build_parser().parse_args(["--gpus_per_run", "4"]))(run) == 1  # local: spawn


# --- SLURM: command lines and bad input -----------------------------------------------------------------------------
OPTIONS = slurm.JobOptions(partition="gpu", time_min=90, gpus_per_run=4, cpus_per_run=16, array_parallelism=8,
                           extra={"account": "proj", "qos": "high"})


def test_sbatch_script_carries_the_sweep_options(tmp_path):
    script = slurm.sbatch_script(OPTIONS, tmp_path / "Rabc00001", "Rabc00001", PROJECT, token="Rabc00001.1.ff")
    for line in ["#SBATCH --job-name=Rabc00001", "#SBATCH --partition=gpu", "#SBATCH --time=90",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=16", "#SBATCH --nodes=1",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --comment=Rabc00001.1.ff", "#SBATCH --account=proj",
                 "#SBATCH --qos=high", "#SBATCH --signal=USR2@90", f"export PYTHONPATH={PROJECT}"]:
        assert line in script, (line, script)
    assert "submitit.core._submit" in script and str(tmp_path / "Rabc00001") in script
    bare = slurm.sbatch_script(slurm.JobOptions(), tmp_path, "R1", PROJECT)
    assert "--partition" not in bare and "--gpus-per-node" not in bare and "--cpus-per-task" not in bare


def test_the_submitted_script_is_the_rendered_one(tmp_path, monkeypatch):
    """The launcher's parameters through submitit's AutoExecutor(cluster="slurm") give the same sbatch script."""
    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # "srun is here"
    folder = tmp_path / "Rabc00001"
    params = slurm.executor_parameters(OPTIONS, "slurm", "Rabc00001", "Rabc00001.1.ff", PROJECT)
    executor = slurm.make_executor("slurm", folder, params)
    assert executor.cluster == "slurm"
    submitted = executor._executor._make_submission_file_text(executor._executor._submitit_command_str, "x")
    rendered = slurm.sbatch_script(OPTIONS, folder, "Rabc00001", PROJECT, token="Rabc00001.1.ff",
                                   python=executor._executor.python)
    assert submitted == rendered


def fake_slurm(tmp_path: Path, monkeypatch, queue: str = "") -> Path:
    """sbatch, squeue, scancel and srun on PATH that record their calls in ``calls.txt``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"sbatch": 'cp "$1" "$(dirname "$0")/last.sbatch"; echo "Submitted batch job 4242"',
               "squeue": f"printf '%s' '{queue}'", "scancel": "true", "srun": "true"}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\necho "{name} $*" >> "$(dirname "$0")/calls.txt"\n{body}\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_slurm_launcher_submits_finds_by_name_and_cancels(tmp_path, monkeypatch):
    bin_dir = fake_slurm(tmp_path, monkeypatch, queue="4242|PENDING|Rabc00001.1.ff\n")
    launcher = slurm.SubmititLauncher("slurm", tmp_path / "submitit", OPTIONS, PROJECT)
    handle = launcher.start(["python", "dol1.py", "--rounds=5"], {ATTEMPT_ENV: "Rabc00001.1.ff"}, tmp_path / "log",
                            "Rabc00001")
    assert (handle.job_id, handle.token, handle.pid) == ("4242", "Rabc00001.1.ff", None)
    script = (bin_dir / "last.sbatch").read_text()
    assert "#SBATCH --job-name=Rabc00001" in script and "#SBATCH --comment=Rabc00001.1.ff" in script
    found = launcher.find("Rabc00001", ["python", "dol1.py"])
    assert (found.job_id, found.token) == ("4242", "Rabc00001.1.ff")
    monkeypatch.setattr(launcher, "poll", lambda h: True)
    launcher.terminate(found)
    launcher.kill(found)
    calls = (bin_dir / "calls.txt").read_text().splitlines()
    assert f"squeue --noheader --user={os.environ.get('USER') or __import__('getpass').getuser()} " \
           f"--name=Rabc00001 --format=%i|%T|%k" in calls
    assert calls[-3:] == ["scancel 4242", "scancel --signal=KILL --full 4242", "scancel 4242"]


def test_a_resumed_master_never_submits_a_queued_job_again(tmp_path, monkeypatch, capsys):
    """Killed between sbatch and its tracker write: the tracker says running without a job id; the job is found by
    its name in squeue and adopted, nothing is submitted."""
    fake_slurm(tmp_path, monkeypatch)
    parsed = master.build_parser().parse_args(argv(tmp_path, "--launcher", "slurm", grid={"step_size": [0.01]}))
    runs, spec, sweep_id, slots = master.plan(parsed)
    grid, fixed = spec.grid, spec.fixed
    (tmp_path / "bin" / "squeue").write_text(f"#!/bin/sh\necho \"squeue $*\" >> \"$(dirname \"$0\")/calls.txt\"\n"
                                             f"echo '777|RUNNING|{runs[0].run_id}.1.aa'\n")
    scheduler = sweep.Scheduler(runs, slots, tmp_path / "tracker.json", {"id": sweep_id, "grid": grid,
                                                                         "fixed": fixed},
                                launcher=master.make_launcher(parsed))
    scheduler.prepare()
    assert scheduler.active[0].handle.job_id == "777" and scheduler.entry(runs[0])["token"] == f"{runs[0].run_id}.1.aa"
    assert scheduler.entry(runs[0])["status"] == "running" and scheduler.queue == []
    assert "sbatch" not in (tmp_path / "bin" / "calls.txt").read_text()


def test_launcher_slurm_without_slurm_is_refused_before_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    with pytest.raises(SystemExit) as exit_info:
        master.main(argv(tmp_path, "--launcher", "slurm"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "no SLURM here (sbatch is not on PATH)" in err and "--launcher submitit_local" in err
    assert not (tmp_path / "tracker.json").exists() and not (tmp_path / "submitit").exists()


@pytest.mark.parametrize("more, needle", [
    (["--launcher", "slurm", "--slurm_extra", '{"acount": "proj"}'], "unknown SLURM option(s) ['acount']"),
    (["--launcher", "slurm", "--slurm_extra", '{"partition": "x"}'], "come from master.py's own flags"),
    (["--launcher", "slurm", "--slurm_extra", "[1, 2]"], "--slurm_extra must be a JSON object"),
    (["--launcher", "slurm", "--slurm_extra", "{oops"], "--slurm_extra is not valid JSON"),
    (["--launcher", "slurm", "--slurm_extra", '{"qos": null}'], "'qos' must be a string"),
    (["--launcher", "slurm", "--slurm_time_min", "0"], "--slurm_time_min must be a number in [1, 525600]"),
    (["--launcher", "slurm", "--slurm_array_parallelism", "0"], "--slurm_array_parallelism must be a number"),
    (["--launcher", "submitit_local", "--gpus_per_run", "0"], "--gpus_per_run must be a number in [1, 1024]"),
    (["--slurm_partition", "gpu"], "--slurm_partition: only for --launcher slurm or submitit_local (got --launcher local)"),
    (["--launcher", "pbs"], "argument --launcher: invalid choice: 'pbs'"),
])
def test_bad_slurm_options_are_refused_naming_them(tmp_path, capsys, monkeypatch, more, needle):
    fake_slurm(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        master.main(argv(tmp_path, *more))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and needle in err, err
    assert not (tmp_path / "tracker.json").exists() and not (tmp_path / "bin" / "calls.txt").exists()


def test_a_slurm_dry_run_shows_the_sbatch_script_without_slurm(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert master.main(argv(tmp_path, "--launcher", "slurm", "--slurm_partition", "gpu", "--dry_run")) == 0
    printed = capsys.readouterr().out
    assert "16 slots on slurm" in printed and "#SBATCH --partition=gpu" in printed and "dry run: nothing started" \
        in printed
    assert not (tmp_path / "tracker.json").exists() and not (tmp_path / "submitit").exists()


def test_a_job_runs_its_command_into_the_run_log_ignoring_slurm_usr2(tmp_path):
    """SLURM's USR2 warning reaches every process of the job: the run must not die of it (submitit handles it)."""
    log = tmp_path / "reports" / "R1.log"
    command = [sys.executable, "-c", "import os, signal; print(os.environ['DOL1_ATTEMPT'], "
               "signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN); raise SystemExit(3)"]
    assert slurm.RunCommand(command, {ATTEMPT_ENV: "R1.1.aa"}, log)() == 3  # the job's result: the exit status
    assert log.read_text() == "R1.1.aa True\n"


class _LostTheLockRace:
    """A launcher whose attempt exits 3 (the run is locked by another process) and whose lock holder, another
    master's attempt, has finished the run by the time the exit status is read."""

    def __init__(self, run):
        self.run = run

    def start(self, command, env, log_path, name=""):
        Reporter({"a": 1}, self.run.reports_dir, run=self.run.run_id, attempt=f"{self.run.run_id}.1.other").finish(
            "finished")
        return launchers.Handle(None, token=env[ATTEMPT_ENV], job_id="1")

    def poll(self, handle):
        handle.returncode = 3
        return False

    def find(self, name, command):
        return None


def test_a_run_that_another_master_finished_while_we_lost_its_lock_is_done_not_failed(tmp_path):
    """Two masters (different trackers) start the same run: ours exits 3; when we read that, the winner has already
    finished. Not a failure of the run (with --max_attempts 1 it was reported FAILED and the master exited 1)."""
    run = sweep.Run("Rrace0001", {}, {}, [], {"rounds": 1}, tmp_path / "reports")
    scheduler = sweep.Scheduler([run], [sweep.Slot("cpu", ())], tmp_path / "tracker.json",
                                {"id": "S0", "grid": {}, "fixed": {}}, launcher=_LostTheLockRace(run),
                                max_attempts=1, poll_interval=0.01)
    assert scheduler.run() == {"Rrace0001": "done"}
    assert scheduler.entry(run)["failures"] == 0


class _LostTheLockRaceSqueueDown(_LostTheLockRace):
    """The same race, and squeue fails whenever the master looks for a live job after the start."""

    looks = 0

    def find(self, name, command):
        self.looks += 1
        if self.looks > 2:  # start-up reconciliation and the look before the start succeed
            raise OSError("squeue failed (exit 1): slurm_load_jobs error: Socket timed out on send/recv operation")
        return None


def test_a_failed_look_after_losing_the_lock_race_falls_back_on_the_lock(tmp_path):
    """After exit 3 the master asks who runs the run now; when squeue fails it must not crash: the run's lock (a
    local file) and its report still decide (here: finished elsewhere, so done, not failed)."""
    run = sweep.Run("Rrace0002", {}, {}, [], {"rounds": 1}, tmp_path / "reports")
    scheduler = sweep.Scheduler([run], [sweep.Slot("cpu", ())], tmp_path / "tracker.json",
                                {"id": "S0", "grid": {}, "fixed": {}}, launcher=_LostTheLockRaceSqueueDown(run),
                                max_attempts=1, poll_interval=0.01)
    assert scheduler.run() == {"Rrace0002": "done"}
    assert scheduler.entry(run)["failures"] == 0 and scheduler.launcher.looks >= 3


def _job_result(tmp_path: Path, value, outcome: str = "success") -> Path:
    """The result pickle submitit's job process wrote for job 4242 of run Rabc00001."""
    from submitit.core.utils import JobPaths, cloudpickle_dump
    path = JobPaths(tmp_path / "submitit" / "Rabc00001", "4242").result_pickle
    path.parent.mkdir(parents=True, exist_ok=True)
    cloudpickle_dump((outcome, value), path)
    return path


def test_a_job_still_completing_after_its_run_failed_is_not_adopted_again(tmp_path, monkeypatch):
    """squeue lists a job COMPLETING for a while after its result is written: adopting it would judge the same
    failure a second time (two failures counted for one, so the default --max_attempts 2 never retries)."""
    fake_slurm(tmp_path, monkeypatch, queue="4242|COMPLETING|Rabc00001.1.ff\n")
    _job_result(tmp_path, 1)
    launcher = slurm.SubmititLauncher("slurm", tmp_path / "submitit", OPTIONS, PROJECT)
    assert launcher.find("Rabc00001", ["python", "dol1.py"]) is None


def test_a_preempted_job_requeued_by_slurm_stays_adopted_until_it_runs_again(tmp_path, monkeypatch):
    """SLURM's preemption sends SIGTERM: the run checkpoints and exits 130, submitit writes that result, SLURM
    requeues the same job. That stale result must not end the adopted job at every poll (a loop of interrupted /
    queued again / adopted, one squeue per poll, for as long as the job waits in the queue)."""
    bin_dir = fake_slurm(tmp_path, monkeypatch, queue="4242|PENDING|Rabc00001.1.ff\n")
    result = _job_result(tmp_path, 130)
    launcher = slurm.SubmititLauncher("slurm", tmp_path / "submitit", OPTIONS, PROJECT)
    handle = launcher.find("Rabc00001", ["python", "dol1.py"])
    assert handle is not None and launcher.poll(handle) and launcher.poll(handle)
    before = result.stat().st_mtime_ns
    _job_result(tmp_path, 0)  # the requeued job ran and finished
    os.utime(result, ns=(before + 10**9, before + 10**9))
    assert not launcher.poll(handle) and handle.returncode == 0
    assert (bin_dir / "calls.txt").read_text().count("squeue") <= 2  # not one per poll


def test_an_interrupted_job_that_slurm_did_not_requeue_ends_once_squeue_drops_it(tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch, queue="4242|COMPLETING|Rabc00001.1.ff\n")
    _job_result(tmp_path, 130)
    launcher = slurm.SubmititLauncher("slurm", tmp_path / "submitit", OPTIONS, PROJECT)
    handle = launcher.find("Rabc00001", ["python", "dol1.py"])
    (tmp_path / "bin" / "squeue").write_text("#!/bin/sh\n")  # cancelled, not requeued: gone from the queue
    monkeypatch.setattr(slurm, "SQUEUE_EVERY_S", 0.0)
    assert not launcher.poll(handle) and handle.returncode == 130


class _Raises(_LostTheLockRace):
    """A launcher whose attempt writes a failed report under its token and exits 1."""

    def start(self, command, env, log_path, name=""):
        Reporter({"a": 1}, self.run.reports_dir, run=self.run.run_id, attempt=env[ATTEMPT_ENV]).finish(
            "failed", "exit code 1: RuntimeError: boom")
        return launchers.Handle(None, token=env[ATTEMPT_ENV], job_id="1")

    def poll(self, handle):
        handle.returncode = 1
        return False


def test_a_failed_attempt_is_recorded_with_the_reason_its_report_gives(tmp_path):
    run = sweep.Run("Rboom0001", {}, {}, [], {"rounds": 1}, tmp_path / "reports")
    events = []
    scheduler = sweep.Scheduler([run], [sweep.Slot("cpu", ())], tmp_path / "tracker.json",
                                {"id": "S0", "grid": {}, "fixed": {}}, launcher=_Raises(run), max_attempts=1,
                                poll_interval=0.01, on_event=lambda kind, r, entry: events.append((kind, entry and
                                                                                                   entry["detail"])))
    assert scheduler.run() == {"Rboom0001": "failed"}
    assert ("failed", "exit code 1: RuntimeError: boom") in events


@pytest.mark.parametrize("extra, needle", [
    ('{"mem": {"a": 1}}', "'mem' must be a string, got {'a': 1}"),
    ('{"use_srun": "false"}', "'use_srun' must be a boolean, got 'false'"),  # a truthy string
    ('{"signal_delay_s": "90s"}', "'signal_delay_s' must be an integer, got '90s'"),
    ('{"teardown": "rm -rf x"}', "'teardown' must be a list, got 'rm -rf x'"),  # joined character by character
])
def test_slurm_extra_values_of_the_wrong_type_are_refused(extra, needle):
    with pytest.raises(slurm.ConfigError) as info:
        slurm.parse_extra(extra)
    assert needle in str(info.value)
    assert slurm.parse_extra('{"mem": "32G", "exclusive": true, "srun_args": ["--cpu-bind=none"], "num_gpus": 2, '
                             '"additional_parameters": {"licenses": "x"}, "mem_per_cpu": 4000}')


class _SqueueHiccup(_LostTheLockRace):
    """A launcher whose look for a live job before the start fails once (squeue timed out, as on a busy cluster)."""

    looks = 0

    def find(self, name, command):
        self.looks += 1
        if self.looks == 2:  # the first look is the master's start-up reconciliation
            raise OSError("squeue failed (exit 1): slurm_load_jobs error: Socket timed out on send/recv operation")
        return None

    def start(self, command, env, log_path, name=""):
        Reporter({"a": 1}, self.run.reports_dir, run=self.run.run_id, attempt=env[ATTEMPT_ENV]).finish()
        return launchers.Handle(None, token=env[ATTEMPT_ENV], job_id="1")

    def poll(self, handle):
        handle.returncode = 0
        return False


def test_a_failed_look_for_live_jobs_delays_the_start_and_does_not_kill_the_master(tmp_path):
    run = sweep.Run("Rhic00001", {}, {}, [], {"rounds": 1}, tmp_path / "reports")
    scheduler = sweep.Scheduler([run], [sweep.Slot("cpu", ())], tmp_path / "tracker.json",
                                {"id": "S0", "grid": {}, "fixed": {}}, launcher=_SqueueHiccup(run),
                                poll_interval=0.01)
    assert scheduler.run() == {"Rhic00001": "done"}
    assert scheduler.entry(run)["attempts"] == 1 and scheduler.launcher.looks == 3
