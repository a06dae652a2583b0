"""Hardening, round 3: no sweep reports work it did not do, no schedule flips the sign of the learning rate, no status
is left "alive" after a failure, and the smaller cases (start-up signals, leftover environment, clamped batches,
meaningless values). Each test failed before its fix."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dol1
import master
from src.reporting import read_report
from sweep_helpers import PROJECT, master_args, tiny, tracker

TINY = ["--model", "mlp", "--config", "[8]", "--dataset_name", "digits_flat", "--rounds", "12", "--batch_size", "32",
        "--cuda_core", "-1", "--measurement_sampling_rate", "0", "--report_sampling_rate", "3",
        "--checkpoint_every", "0", "--eval_samples", "128"]


def units(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "Units.txt"
    path.write_text(text)
    return ["--units_file", str(path)]


# --- 1. a sweep never reports a run it did not run --------------------------------------------------------------
def test_a_grid_over_workers_of_a_multi_worker_engine_plans_every_run(tmp_path, capsys):
    fixed = {"training_mode": "blockwise", "model": "mlp", "config": [256] * 6, "dataset_name": "digits_flat",
             "rounds": 20}
    master.main(master_args(tmp_path, {"n_workers": [1, 2, 4], "K": [1, 5]}, fixed, "--dry_run"))
    out = capsys.readouterr().out
    assert "6 runs" in out and len({line.split()[0] for line in out.splitlines() if line.startswith("  R")}) == 6


@pytest.mark.parametrize("grid, fixed, needles", [
    ({"n_workers": [1, 2]}, {"training_mode": "blockwise_sequential"}, ["'n_workers'", "--fixed", "tag"]),
    ({"output_root": ["a", "b"]}, {}, ["'output_root'", "--fixed"]),
    ({"K": [1, 2]}, {"output_root": "FILE"}, ["is a file"]),
    ({"resume": ["no", "yes"]}, {}, ["'resume'", "master.py resumes"]),
    ({"K": [1, 2]}, {"measure_only": "R12345678"}, ["'measure_only'", "--measure_only"]),
    ({"link_latency": [0, 0.0]}, {}, ["'link_latency'", "twice", "[0, 0.0]"]),
    ({"K": [1, 2, 1]}, {}, ["'K'", "1 twice"]),
    ({"entire_keys": None}, {"training_mode": "entire"}, ["'gamma'", "entire", "--fixed"]),
])
def test_a_sweep_that_cannot_be_honoured_is_refused_before_anything_starts(tmp_path, capsys, grid, fixed, needles):
    (tmp_path / "plain_file").write_text("not a folder")
    fixed = {k: str(tmp_path / "plain_file") if v == "FILE" else v for k, v in fixed.items()}
    grid = {k: [str(tmp_path / v) for v in vs] if k == "output_root" else vs for k, vs in grid.items()}
    if "entire_keys" in grid:  # keys of block-wise training that whole-model training does not use
        grid = {"K": [1, 5], "gamma": [0.5, 1.0]}
    base = {k: v for k, v in tiny(tmp_path / "out").items() if k not in grid}
    with pytest.raises(SystemExit) as info:
        master.main(master_args(tmp_path, grid, base | fixed))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "tracker.json").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_second_sweep_into_another_output_root_runs_there(tmp_path, capsys):
    first = master_args(tmp_path, {"K": [1, 2]}, tiny(tmp_path / "first"))
    assert master.main(first) == 0
    capsys.readouterr()
    second = master_args(tmp_path, {"K": [1, 2]}, tiny(tmp_path / "second"))
    assert master.main(second) == 0
    out = capsys.readouterr().out
    assert "done already" not in out
    reports = sorted(p.name for p in (tmp_path / "second" / "reports").glob("R*.txt"))
    assert len(reports) == 2
    for entry in tracker(tmp_path)["runs"].values():
        assert entry["status"] == "done" and entry["report"].startswith(str(tmp_path / "second"))
        assert read_report(entry["report"])["status"] == "finished"


# --- 2. schedules --------------------------------------------------------------------------------------------------
def test_a_schedule_that_makes_the_learning_rate_negative_is_refused_naming_the_line_and_round(tmp_path, capsys):
    argv = TINY + units(tmp_path, "# lr\n- LearningRateSchedule scheduler=StepLR step_size=5 gamma=-1\n")
    with pytest.raises(SystemExit) as info:
        dol1.main(argv + ["--output_root", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Units.txt:2" in err and "round 5" in err and "-0.005" in err, err
    assert not (tmp_path / "out" / "reports").exists()


@pytest.mark.parametrize("line, needles", [
    ("- LearningRateSchedule scheduler=ReduceLROnPlateau factor=-1", ["factor", "(0, 1)"]),
    ("- LearningRateSchedule scheduler=LinearLR start_factor=1 end_factor=0 total_iters=6", ["round 6", "0.0"]),
    ("- ParameterSchedule key=K values=[[0,1],[4,0]]", ["K = 0", "round 4"]),
    ("- ParameterSchedule key=gamma shape=linear start=1.0 end=-0.5", ["gamma", "round"]),
])
def test_every_bad_scheduled_value_is_refused_before_training(tmp_path, capsys, line, needles):
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + units(tmp_path, line + "\n") + ["--output_root", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Units.txt:1" in err and all(n in err for n in needles), err


def test_a_value_that_turns_bad_while_training_stops_the_run_with_the_reason(tmp_path):
    frame = dol1.main(TINY + units(tmp_path, "- tests.engine_plugins.TurnsNegative at=6\n")
                      + ["--output_root", str(tmp_path)])
    assert frame.round == 6 and frame.stop_kind == "schedule" and "round 6" in frame.stop_reason
    head = read_report(frame.reporter.path)
    assert head["status"] == "stopped" and "learning rate" in head["status_detail"]
    assert all(r["lr"] > 0 for r in frame.history)


# --- 4. a full disk ------------------------------------------------------------------------------------------------
def test_a_failure_on_a_full_disk_still_writes_failed(tmp_path, monkeypatch):
    """The status file is rewritten in place when no new file fits; the report's traceback may not fit."""
    import src.reporting as reporting
    frame = dol1.main(TINY + ["--output_root", str(tmp_path)])
    full = OSError(28, "No space left on device")
    monkeypatch.setattr(reporting, "write_text_atomic", lambda *a, **k: (_ for _ in ()).throw(full))
    monkeypatch.setattr(reporting.Reporter, "log", lambda self, message: (_ for _ in ()).throw(full))
    frame.reporter.fail(full)
    state = json.loads(frame.reporter.status_path.read_text())
    assert state["status"] == "failed" and state["detail"].startswith("no space left on device")
    assert read_report(frame.reporter.path)["status"] == "failed"


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_run_on_a_filesystem_that_fills_up_fails_cleanly_and_resumes_exactly(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "300k"):
        pytest.skip("mounting a small tmpfs needs root (the in-place status rewrite is tested above without it)")
    try:
        argv = [sys.executable, str(PROJECT / "dol1.py"), *TINY, "--config", "[64, 64]", "--rounds", "40",
                "--checkpoint_every", "5", *units(tmp_path, "# none\n")]
        out = subprocess.run(argv + ["--output_root", str(disk / "out")], capture_output=True, text=True, timeout=300)
        assert out.returncode == 1 and "No space left on device" in out.stderr
        reports = disk / "out" / "reports"
        state = json.loads(next(reports.glob("R*.status.json")).read_text())
        assert state["status"] == "failed" and state["detail"].startswith("no space left on device")
        assert read_report(next(reports.glob("R*.txt")))["status"] == "failed"
        assert list(disk.rglob("*.tmp*")) == []  # no half-written checkpoint or status left behind
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        resumed = subprocess.run(argv + ["--output_root", str(disk / "out"), "--resume"], capture_output=True,
                                 text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        whole = subprocess.run(argv + ["--output_root", str(tmp_path / "whole")], capture_output=True, text=True,
                               timeout=300)
        assert whole.returncode == 0
        a = torch.load(next((disk / "out" / "reports").glob("R*.model.pt")), weights_only=True)
        b = torch.load(next((tmp_path / "whole" / "reports").glob("R*.model.pt")), weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# --- 6. smaller cases ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_during_start_up_exits_130_and_says_interrupted(tmp_path):
    proc = subprocess.Popen([sys.executable, str(PROJECT / "dol1.py"), *TINY, "--output_root", str(tmp_path)],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # importing torch takes longer
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted during start-up (SIGTERM)" in err
    assert not (tmp_path / "reports").exists()


def test_a_deterministic_notebook_run_leaves_no_environment_behind(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    dol1.run(model="mlp", config=[8], dataset_name="digits_flat", rounds=2, cuda_core=-1, checkpoint_every=0,
             measurement_sampling_rate=0, deterministic=True, output_root=str(tmp_path))
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()


def test_a_batch_above_the_training_set_is_recorded_as_the_batch_trained_with(tmp_path, capsys):
    frame = dol1.main(TINY + ["--batch_size", "5000", "--output_root", str(tmp_path)])
    n = len(frame.data.train)
    assert read_report(frame.reporter.path)["run_info"]["batch_size"] == n == frame.train_batches.batch_size
    assert capsys.readouterr().err.count(f"effective batch size {n}") == 1
    assert f"effective batch size {n}" in frame.reporter.path.read_text()
    assert frame.samples == 12 * n


@pytest.mark.parametrize("argv, needles", [
    (["--momentum", "1"], ["--momentum", "[0, 1)"]),
    (["--momentum", "-0.1"], ["--momentum", "[0, 1)"]),
    (["--target_value", "1.5"], ["--target_value", "[0, 1]"]),
    (["--target_value", "-0.2", "--target_monitor", "accuracy"], ["--target_value", "[0, 1]"]),
    (["--early_stop_min_delta", "-0.01"], ["--early_stop_min_delta", ">= 0"]),
])
def test_meaningless_values_are_refused(tmp_path, capsys, argv, needles):
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + argv + ["--output_root", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and all(n in err for n in needles), err
    assert not (tmp_path / "reports").exists()


def test_a_loss_target_may_be_any_number(tmp_path):
    frame = dol1.main(TINY + ["--target_monitor", "loss", "--target_value", "3.5", "--output_root", str(tmp_path)])
    assert frame.stop_kind == "target"


def test_a_fresh_start_over_an_earlier_attempts_checkpoint_says_so_and_keeps_it(tmp_path, capsys):
    argv = [*TINY[:-4], "--checkpoint_every", "4", "--eval_samples", "128", "--output_root", str(tmp_path),
            *units(tmp_path, "# none")]
    first = dol1.main(argv)
    assert "earlier attempt" not in capsys.readouterr().err
    dol1.main(argv)  # the same command again, --resume no (the default): it starts over
    err = capsys.readouterr().err
    assert f"an earlier attempt of {first.run.id} left a checkpoint" in err and "--resume yes" in err
    assert list((tmp_path / "checkpoints").glob(f"{first.run.id}.1/round_*.pt"))  # kept aside, not lost
