"""master.py and src/Sweeps: a CPU sweep end to end, resume after kill -9 and after SIGTERM, retries,
dry run, input checks.

Every run is a real dol1.py process on a tiny MLP; outputs and trackers live under tmp_path.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import master
from src import Sweeps as sweep
from src.Sweeps import launchers
from src.reporting import read_report
from sweep_helpers import master_args, start_master, tiny, tracker, wait_for

pytestmark = pytest.mark.slow

PROJECT = Path(master.__file__).resolve().parent
GRID = {"step_size": [1e-3, 1e-2], "K": [1, 2]}


args = master_args


def live_runs(tmp_path: Path) -> list[int]:
    """Pids of dol1.py processes writing under tmp_path (ours: the path is unique to the test)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = entry.joinpath("cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "dol1.py" in cmdline and str(tmp_path) in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def no_leftover_runs(tmp_path):
    """Kill (by pid) any dol1.py run a failing test left behind."""
    yield
    for pid in live_runs(tmp_path):
        os.kill(pid, signal.SIGKILL)


def assert_all_done_once(tmp_path: Path, data: dict, n_runs: int) -> None:
    runs = data["runs"]
    assert len(runs) == n_runs
    for rid, entry in runs.items():
        assert entry["status"] == "done", (rid, entry)
        assert entry["attempts"] == 1 and entry["failures"] == 0, (rid, entry)
        report = Path(entry["report"])
        assert report.name == f"{rid}.txt" and read_report(report)["status"] == "finished"
        assert read_report(report)["H"] == entry["H"]
        assert not list(report.parent.glob(f"{rid}.*.txt")), f"{rid} was started twice"
        assert entry["rounds_done"] == entry["rounds_total"] == 20


def test_sweep_completes_with_tracker_summary_and_figure(tmp_path, capsys):
    out = tmp_path / "out"
    parsed, failures, stop = [0], [], threading.Event()

    def reader():  # another reader of the tracker, as a dashboard would be
        while not stop.is_set():
            try:
                with open(tmp_path / "tracker.json") as f:
                    json.load(f)
                parsed[0] += 1
            except FileNotFoundError:
                pass
            except json.JSONDecodeError as err:
                failures.append(err)
            time.sleep(0.002)  # leave the cores to the runs

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        assert master.main(args(tmp_path, GRID, tiny(out))) == 0
    finally:
        stop.set()
        thread.join()
    assert failures == [] and parsed[0] > 20

    data = tracker(tmp_path)
    assert_all_done_once(tmp_path, data, 4)
    for entry in data["runs"].values():
        assert entry["status"] in sweep.STATUSES
        assert entry["device"] == "cpu" and entry["exit_code"] == 0 and Path(entry["log"]).is_file()
        assert entry["started"] <= entry["ended"]
    assert {(e["overrides"]["step_size"], e["overrides"]["K"]) for e in data["runs"].values()} == \
        {(s, k) for s in GRID["step_size"] for k in GRID["K"]}
    (sweep_id, info), = data["sweeps"].items()
    assert info["status"] == "ended" and sorted(info["runs"]) == sorted(data["runs"])
    summary = (out / "figures" / f"sweep_summary_{sweep_id}.md").read_text()
    printed = capsys.readouterr().out
    for rid in data["runs"]:
        assert rid in summary and rid in printed
    assert (out / "figures" / f"sweep_{sweep_id}.png").stat().st_size > 0
    assert all(Path(e["log"]).parent == out / "reports" for e in data["runs"].values())

    # starting the same sweep again starts nothing
    assert master.main(args(tmp_path, GRID, tiny(out))) == 0
    assert all(e["attempts"] == 1 for e in tracker(tmp_path)["runs"].values())
    assert capsys.readouterr().out.count("done already") == 4


def test_resume_after_kill_9_runs_everything_exactly_once(tmp_path, capsys):
    out = tmp_path / "out"
    # a short and a long run start together, a third waits; the kill comes when the short one is done
    argv = args(tmp_path, {"communication_delay": [0.0, 0.25, 0.01]}, tiny(out))
    first = start_master(tmp_path, argv)
    try:
        def some_done_some_not():
            statuses = [e["status"] for e in tracker(tmp_path)["runs"].values()]
            return "done" in statuses and ("running" in statuses or "pending" in statuses)
        wait_for(some_done_some_not, 120, "a tracker with a done run and an unfinished one")
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert tracker(tmp_path)["sweeps"]  # the killed master left a valid tracker behind

    assert master.main(argv) == 0
    assert_all_done_once(tmp_path, tracker(tmp_path), 3)
    assert live_runs(tmp_path) == []
    assert "adopted" in capsys.readouterr().out  # the long run was waited for, not started again


def test_sigterm_stops_every_run_and_resume_reruns_them(tmp_path):
    out = tmp_path / "out"
    argv = args(tmp_path, {"seed": [0, 1]}, tiny(out, communication_delay=0.15), "--grace", "20")
    first = start_master(tmp_path, argv)

    def both_training():  # each run has written its report: dol1.py now turns SIGTERM into an orderly stop
        entries = tracker(tmp_path)["runs"].values()
        return len(entries) == 2 and all(e["pid"] == read_report(e["report"])["pid"] for e in entries)
    try:
        wait_for(both_training, 120, "two runs under way")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 130
    finally:
        first.kill()
    data = tracker(tmp_path)
    assert [e["status"] for e in data["runs"].values()] == ["interrupted"] * 2
    assert live_runs(tmp_path) == []
    for entry in data["runs"].values():
        assert read_report(entry["report"])["status"] == "interrupted"

    assert master.main(argv) == 0
    for entry in tracker(tmp_path)["runs"].values():
        assert (entry["status"], entry["attempts"], entry["failures"]) == ("done", 2, 0)


def test_retry_once_then_success_and_give_up_after_max_attempts(tmp_path):
    out = tmp_path / "out"
    marker = tmp_path / "marker"
    (tmp_path / "once.txt").write_text(f"- tests.sweep_plugins.FailOnce marker={marker}\n")
    (tmp_path / "always.txt").write_text("- tests.sweep_plugins.AlwaysFail\n")
    grid = {"units_file": [str(tmp_path / "once.txt"), str(tmp_path / "always.txt")]}
    with pytest.raises(SystemExit) as exit_info:
        master.main(args(tmp_path, grid, tiny(out, measurement_sampling_rate=10), "--max_attempts", "2"))
    assert exit_info.value.code == 1
    assert marker.exists()
    entries = {Path(e["overrides"]["units_file"]).stem: e for e in tracker(tmp_path)["runs"].values()}
    once, always = entries["once"], entries["always"]
    assert (once["status"], once["attempts"], once["failures"], once["exit_code"]) == ("done", 2, 1, 0)
    assert read_report(once["report"])["status"] == "finished"
    assert (always["status"], always["attempts"], always["failures"], always["exit_code"]) == ("failed", 2, 2, 1)
    assert "AlwaysFail" in read_report(always["report"])["status_detail"]
    assert Path(always["log"]).read_text().count("master.py: attempt") == 2

    # a resume does not retry a run that used up its attempts
    with pytest.raises(SystemExit):
        master.main(args(tmp_path, grid, tiny(out, measurement_sampling_rate=10), "--max_attempts", "2"))
    assert tracker(tmp_path)["runs"][Path(always["report"]).stem]["attempts"] == 2


def test_dry_run_of_a_sweep_file_starts_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "sweep.json").write_text(json.dumps({"grid": GRID, "fixed": tiny(out)}))
    assert master.main(["--sweep", str(tmp_path / "sweep.json"), "--tracker", str(tmp_path / "tracker.json"),
                        "--cpu", "--cpu_slots", "2", "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[new]") == 4 and "2 slots on cpu" in printed and "OMP_NUM_THREADS" in printed
    assert not (tmp_path / "tracker.json").exists() and not (tmp_path / "tracker.json.lock").exists()
    assert not out.exists() and live_runs(tmp_path) == []


@pytest.mark.parametrize("grid, needle", [
    ({"nope": [1]}, "unknown dol1.py key 'nope'"),
    ({"modle": ["mlp"]}, "Did you mean 'model'?"),
    ({"model": ["mlp", "nope"]}, "--model 'nope' is not valid"),
    ({"rounds": [10, "ten"]}, "expected int for --rounds"),
    ({"rounds": 10}, "grid values must be non-empty lists"),
])
def test_bad_input_is_refused_before_anything_starts(tmp_path, capsys, grid, needle):
    with pytest.raises(SystemExit) as exit_info:
        fixed = {k: v for k, v in tiny(tmp_path / "out").items() if k not in grid}
        master.main(args(tmp_path, grid, fixed))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err  # one line: dol1's message, not argparse's usage screen
    assert not (tmp_path / "tracker.json").exists() and not (tmp_path / "out").exists()


def test_second_master_on_the_same_tracker_is_refused(tmp_path, capsys):
    with sweep.tracker_lock(tmp_path / "tracker.json"):
        with pytest.raises(SystemExit) as exit_info:
            master.main(args(tmp_path, GRID, tiny(tmp_path / "out")))
    assert exit_info.value.code == 3
    assert f"another master (pid {os.getpid()})" in capsys.readouterr().err
    assert live_runs(tmp_path) == [] and not (tmp_path / "tracker.json").exists()


def test_slots_pack_gpus_and_cap_threads():
    slots = launchers.plan_slots(["2", "5"], runs_per_gpu=2, cpu_slots=3, cores=16)
    assert [s.device for s in slots] == ["cuda:2", "cuda:5", "cuda:2", "cuda:5"]
    assert dict(slots[1].env) == {"CUDA_VISIBLE_DEVICES": "5", "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    cpu = launchers.plan_slots([], runs_per_gpu=2, cpu_slots=3, cores=16)
    assert len(cpu) == 3 and dict(cpu[0].env) == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "5",
                                                  "MKL_NUM_THREADS": "5"}


def test_visible_gpus_honour_cuda_visible_devices(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    assert launchers.visible_gpus() == ["3", "7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launchers.visible_gpus() == ["0", "1"]


def test_argv_round_trips_through_dol1():
    import dol1
    overrides = {"config": [[16, 16], [32]], "model": "feedforward_ensemble", "step_size": 1e-3, "target_value": None,
                 "data_root": "-odd name", "rounds": 3}
    H = dol1.resolve_config(sweep.to_argv(overrides))
    assert {k: H[k] for k in overrides} == overrides


def test_figure_shows_the_best_finite_step_size_per_k(tmp_path):
    def run(rid: str, step_size: float, K: int, losses: list) -> sweep.Run:
        r = sweep.Run(rid, {}, {"step_size": step_size, "K": K}, [], {"rounds": len(losses)}, tmp_path)
        r.metrics.write_text("".join(json.dumps({"round": i, "loss": v}) + "\n" for i, v in enumerate(losses)))
        return r
    # a diverged run listed first must not stay "best": nothing compares below NaN
    runs = [run("R1", 1.0, 1, [2.3, float("nan")]), run("R2", 0.01, 1, [2.3, 0.5]), run("R3", 0.001, 1, [2.3, 2.0]),
            run("R4", 1.0, 5, [2.3, 0.1]), run("R5", 0.01, 5, [2.3, 0.3])]
    grid = {"step_size": [1.0, 0.01, 0.001], "K": [1, 5]}
    assert [label for label, _ in master.figure_curves(runs, grid, "round")] == [
        "K=1, best step_size=0.01 (loss 0.5 at round 1)", "K=5, best step_size=1 (loss 0.1 at round 1) [grid edge]"]
    # records without the x-axis key (here: samples) are compared by their final loss
    assert master.figure_curves(runs, grid)[0][0] == "K=1, best step_size=0.01 (final loss 0.5)"
    written = master.sweep_figure(runs, grid, tmp_path / "figures" / "sweep", "sweep S0")
    assert [p.suffix for p in written] == [".pdf", ".png"] and all(p.stat().st_size > 0 for p in written)


def test_a_failed_attempt_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "out"
    marker = tmp_path / "marker"
    (tmp_path / "once.txt").write_text(f"- tests.sweep_plugins.FailOnce marker={marker}\n")
    fixed = tiny(out, measurement_sampling_rate=10, checkpoint_every=5, units_file=str(tmp_path / "once.txt"))
    assert master.main(args(tmp_path, {"step_size": [0.01]}, fixed, "--max_attempts", "2")) == 0
    entry = next(iter(tracker(tmp_path)["runs"].values()))
    assert (entry["status"], entry["attempts"], entry["failures"]) == ("done", 2, 1)
    report = Path(entry["report"]).read_text()
    assert "Resumed at round 5 from" in report  # the first attempt failed at round 10, after the checkpoint of 5
    assert read_report(entry["report"])["status"] == "finished" and "--resume=auto" in " ".join(entry["argv"])


def test_a_live_run_is_adopted_by_its_lock_whatever_its_command_line(tmp_path):
    """A run started by someone else (here dol1.py directly, keys in another order) is waited for, never started
    a second time: the master recognises it by run id and lock, not by argv text."""
    out = tmp_path / "out"
    fixed = tiny(out, rounds=1500)
    argv = [f"--{k}={v if isinstance(v, str) else repr(v)}" for k, v in reversed(list({**fixed, "step_size": 0.01}
                                                                                    .items()))]
    other = subprocess.Popen([sys.executable, str(PROJECT / "dol1.py"), *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: list((out / "reports").glob("R*.lock")) and list((out / "reports").glob("R*.metrics.jsonl"))
             and (out / "reports").glob("R*.metrics.jsonl").__next__().read_text().count("\n") >= 1, 60,
             "the outside run to start")
    assert master.main(args(tmp_path, {"step_size": [0.01]}, fixed)) == 0
    assert other.wait(120) == 0
    entry = next(iter(tracker(tmp_path)["runs"].values()))
    assert entry["attempts"] == 0 and entry["status"] == "done" and entry["pid"] == other.pid
    assert len(list((out / "reports").glob("R*.txt"))) == 1  # one run, one report: nothing archived


def test_diverged_run_is_a_result_not_retried(tmp_path):
    out = tmp_path / "out"
    fixed = tiny(out, optimizer="sgd", rounds=30)
    assert master.main(args(tmp_path, {"step_size": [1e30]}, fixed, "--max_attempts", "3")) == 0
    entry = next(iter(tracker(tmp_path)["runs"].values()))
    assert (entry["status"], entry["attempts"], entry["failures"]) == ("diverged", 1, 0)
    assert read_report(entry["report"])["status"] == "diverged"
    assert os.stat(tmp_path / "tracker.json").st_mode & 0o044  # readable by others, like any file of the user


def test_a_run_finished_under_another_tracker_is_not_run_again(tmp_path):
    out = tmp_path / "out"
    assert master.main(args(tmp_path, {"seed": [0, 1]}, tiny(out))) == 0
    other = ["--grid", json.dumps({"seed": [1, 0, 2]}), "--fixed", json.dumps(tiny(out)), "--tracker",
             str(tmp_path / "other.json"), "--cpu", "--cpu_slots", "2", "--poll_interval", "0.1"]
    assert master.main(other) == 0
    entries = json.loads((tmp_path / "other.json").read_text())["runs"]
    assert sorted(e["attempts"] for e in entries.values()) == [0, 0, 1]  # only seed 2 was new
    for rid, entry in entries.items():
        assert Path(entry["log"]).read_text().count("master.py: attempt") == 1, rid
        assert not (out / "reports" / f"{rid}.1.txt").exists()  # nothing archived: nothing ran twice


def test_an_adopted_run_is_alive_until_its_process_is_gone_not_only_until_its_lock_is_free(tmp_path):
    """A run releases its lock, then writes its last files and exits: the sweep waits for the exit."""
    command = (sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path))
    process = subprocess.Popen(list(command))
    try:
        handle = launchers.Handle(process.pid, None, command, lock=(tmp_path, "Rnotheld"))
        assert launchers.LocalLauncher().poll(handle)  # no lock held, the process still runs: alive
    finally:
        process.kill()
        process.wait()
    assert not launchers.LocalLauncher().poll(handle)
