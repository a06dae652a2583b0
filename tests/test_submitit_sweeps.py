"""master.py --launcher submitit_local, for real: submitit's local executor runs every run as a job (its controller,
submitit's job process, then dol1.py), through the same submission and job-state code as on SLURM.

Completion, kill -9 of the master and resume (each run once), a master killed between submission and tracker write,
a failing job retried, cancellation, and a preempted job requeued by submitit that resumes from its checkpoint.
"""
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

import master
from src import Sweeps as sweep
from src.reporting import ATTEMPT_ENV, read_report
from src.Sweeps import launchers
from sweep_helpers import master_args, start_master, tiny, tracker, wait_for

pytestmark = pytest.mark.slow

PROJECT = Path(master.__file__).resolve().parent


def args(tmp_path: Path, grid: dict, fixed: dict, *more: str) -> list[str]:
    return master_args(tmp_path, grid, fixed, "--launcher", "submitit_local", *more)


def ours(tmp_path: Path) -> list[int]:
    """Pids of every process of this test's jobs (controllers, submitit, dol1.py: their command lines name
    tmp_path)."""
    return [pid for pid in map(int, (p.name for p in Path("/proc").glob("[0-9]*")))
            if pid != os.getpid() and str(tmp_path) in " ".join(launchers.cmdline_of(pid) or ())]


@pytest.fixture(autouse=True)
def no_leftover_jobs(tmp_path):
    yield
    for pid in ours(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def submissions(tmp_path: Path, run_id: str) -> int:
    return len(list((tmp_path / "submitit" / run_id).glob("*_submitted.pkl")))


def assert_all_done_once(tmp_path: Path, n_runs: int) -> dict:
    runs = tracker(tmp_path)["runs"]
    assert len(runs) == n_runs
    for rid, entry in runs.items():
        assert (entry["status"], entry["attempts"], entry["failures"]) == ("done", 1, 0), (rid, entry)
        info = read_report(entry["report"])
        assert info["status"] == "finished" and info["attempt"] == entry["token"], (rid, info, entry)
        assert entry["token"].startswith(f"{rid}.1.") and entry["job_id"] and entry["pid"] is None
        assert submissions(tmp_path, rid) == 1, f"{rid} was submitted {submissions(tmp_path, rid)} times"
        assert not list(Path(entry["report"]).parent.glob(f"{rid}.*.txt")), f"{rid} ran twice"
    return runs


def test_a_sweep_of_submitit_jobs_completes(tmp_path, capsys):
    assert master.main(args(tmp_path, {"step_size": [1e-3, 1e-2]}, tiny(tmp_path / "out"))) == 0
    runs = assert_all_done_once(tmp_path, 2)
    assert all(e["exit_code"] == 0 for e in runs.values())  # the job's result: dol1.py's exit status
    printed = capsys.readouterr().out
    assert printed.count("attempt 1, job ") == 2
    for entry in runs.values():
        assert "dol1.py: finished after 20 rounds" in Path(entry["log"]).read_text()  # the run's log, unbuffered
    assert ours(tmp_path) == []


def test_kill_9_of_the_master_then_resume_runs_each_job_once(tmp_path, capsys):
    argv = args(tmp_path, {"communication_delay": [0.0, 0.25, 0.01]}, tiny(tmp_path / "out"))
    first = start_master(tmp_path, argv)
    try:
        def some_done_some_not():
            statuses = [e["status"] for e in tracker(tmp_path)["runs"].values()]
            return "done" in statuses and "running" in statuses
        wait_for(some_done_some_not, 180, "a done job and a running one")
    finally:
        first.kill()
        first.wait()
    assert master.main(argv) == 0
    assert_all_done_once(tmp_path, 3)
    assert "adopted" in capsys.readouterr().out
    assert ours(tmp_path) == []


def test_a_master_killed_between_submission_and_tracker_write_never_submits_twice(tmp_path):
    argv = args(tmp_path, {"step_size": [0.01]}, tiny(tmp_path / "out", rounds=60))
    parsed = master.build_parser().parse_args(argv)
    runs, spec, sweep_id, slots = master.plan(parsed)
    grid, fixed = spec.grid, spec.fixed
    first = sweep.Scheduler(runs, slots, tmp_path / "tracker.json", {"id": sweep_id, "grid": grid, "fixed": fixed},
                            launcher=master.make_launcher(parsed), dol1=PROJECT / "dol1.py", python=sys.executable)
    first.prepare()
    run, entry = runs[0], first.entry(runs[0])
    token = f"{run.run_id}.1.abcdef"  # what _launch saves before it submits ...
    entry.update(status="running", attempts=1, token=token, device="cpu", started=sweep.now())
    first.save()
    first.launcher.start(first.command(run), {**dict(slots[0].env), ATTEMPT_ENV: token}, run.log, run.run_id)
    # ... and the master dies here, before it writes the job id
    assert master.main(argv) == 0
    entry = tracker(tmp_path)["runs"][run.run_id]
    assert (entry["status"], entry["attempts"], entry["token"]) == ("done", 1, token)
    assert submissions(tmp_path, run.run_id) == 1 and read_report(run.report)["attempt"] == token


def test_a_failing_job_is_retried_and_resumes(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "once.txt").write_text(f"- tests.sweep_plugins.FailOnce marker={marker}\n")
    fixed = tiny(tmp_path / "out", measurement_sampling_rate=10, checkpoint_every=5,
                 units_file=str(tmp_path / "once.txt"))
    assert master.main(args(tmp_path, {"step_size": [0.01]}, fixed, "--max_attempts", "2")) == 0
    (rid, entry), = tracker(tmp_path)["runs"].items()
    assert (entry["status"], entry["attempts"], entry["failures"], entry["exit_code"]) == ("done", 2, 1, 0)
    assert entry["token"].startswith(f"{rid}.2.") and read_report(entry["report"])["attempt"] == entry["token"]
    assert submissions(tmp_path, rid) == 2 and "Resumed at round 5 from" in Path(entry["report"]).read_text()


def test_cancelling_the_sweep_interrupts_every_job_and_resume_reruns_them(tmp_path):
    argv = args(tmp_path, {"seed": [0, 1]}, tiny(tmp_path / "out", communication_delay=0.15), "--grace", "30")
    first = start_master(tmp_path, argv)

    def both_training():  # each run has written its report with its token: dol1.py turns SIGTERM into a stop
        entries = tracker(tmp_path)["runs"].values()
        return len(entries) == 2 and all(read_report(e["report"])["attempt"] == e["token"] for e in entries)
    try:
        wait_for(both_training, 180, "two jobs under way")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=90) == 130
    finally:
        first.kill()
    for entry in tracker(tmp_path)["runs"].values():
        assert entry["status"] == "interrupted" and read_report(entry["report"])["status"] == "interrupted"
    wait_for(lambda: ours(tmp_path) == [], 30, "the jobs' processes to end")
    assert master.main(argv) == 0
    for entry in tracker(tmp_path)["runs"].values():
        assert (entry["status"], entry["attempts"], entry["failures"]) == ("done", 2, 0)


def test_a_preempted_job_is_requeued_by_submitit_and_resumes_from_its_checkpoint(tmp_path):
    """SLURM signals a job before preemption or its time limit (USR2); here the same signal goes to submitit's
    job process: the run checkpoints, submitit requeues the job, the same attempt resumes and finishes."""
    argv = args(tmp_path, {"step_size": [0.01]}, tiny(tmp_path / "out", rounds=200, communication_delay=0.05,
                                                       checkpoint_every=5))
    first = start_master(tmp_path, argv)
    try:
        def checkpointed():
            entry = next(iter(tracker(tmp_path)["runs"].values()))
            return entry["rounds_done"] >= 10 and launchers.token_processes(f"{Path(entry['report']).stem}.")
        wait_for(checkpointed, 180, "the run past its first checkpoints")
        (rid, entry), = tracker(tmp_path)["runs"].items()
        run_pid = next(iter(launchers.token_processes(f"{rid}.")))
        os.kill(launchers.parent_of(run_pid), signal.SIGUSR2)  # submitit's job process
        assert first.wait(timeout=300) == 0, (tmp_path / "master.log").read_text()
    finally:
        first.kill()
    (rid, entry), = tracker(tmp_path)["runs"].items()
    assert (entry["status"], entry["attempts"], entry["failures"]) == ("done", 1, 0)
    report = Path(entry["report"]).read_text()
    assert "Resumed at round" in report and read_report(entry["report"])["attempt"] == entry["token"]
    assert "Interrupted: SIGTERM" in report and submissions(tmp_path, rid) == 1
