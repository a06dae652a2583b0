"""Run records: one claimed run per id, checkpoints with exact resume in every engine, saved models, the config file
and its re-run, identity without placement, and the faults around them (kill -9, SIGTERM, corrupt checkpoints)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dol1
from src.Runs.reopen import load_run
from src.records import experiment_id
from src.reporting import read_report

PROJECT = Path(dol1.__file__).resolve().parent
EMPTY_UNITS = "# no plugins\n"
SLOW = ["--model", "cnn", "--config", "[8, 8]", "--dataset_name", "digits", "--batch_size", "32", "--cuda_core", "-1",
        "--measurement_sampling_rate", "0", "--report_sampling_rate", "10", "--checkpoint_every", "4",
        "--eval_samples", "256"]
TINY = ["--model", "mlp", "--config", "[8]", "--dataset_name", "digits_flat", "--rounds", "12", "--batch_size", "32",
        "--cuda_core", "-1", "--measurement_sampling_rate", "0", "--report_sampling_rate", "4",
        "--checkpoint_every", "4"]
ENGINES = {"entire": ["--training_mode", "entire"],
           "sequential": ["--training_mode", "blockwise_sequential", "--K", "2", "--gamma", "0.7",
                          "--active_share", "0.7"],
           "multiprocess": ["--training_mode", "blockwise", "--n_workers", "2", "--K", "2", "--gamma", "0.7"],
           "async_simulated": ["--training_mode", "async_sequential", "--worker_speeds", "[1, 3, 2]", "--step_time", "1",
                               "--max_staleness", "1", "--K", "2", "--gamma", "0.7"],
           # the real asynchronous engine is deterministic (and so exactly resumable) only when synchronous
           "async_synchronous": ["--training_mode", "async", "--max_staleness", "0", "--n_workers", "2", "--K", "2",
                                 "--gamma", "0.7"]}
TIMING = {"wall_time", "compute_time", "communication_time", "compute_time_share", "train_time", "measure_time",
          "eval_time", "worker_compute_time",
          "worker_wait_time",  # timings, and what depends on the order in which a round's writes arrive:
          "worker_staleness_mean", "worker_staleness_max"}


def units(tmp_path: Path, text: str = EMPTY_UNITS) -> list[str]:
    path = tmp_path / "Units.txt"
    path.write_text(text)
    return ["--units_file", str(path)]


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(PROJECT / "dol1.py"), *argv], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def run_to_end(argv: list[str], log: Path, timeout: float = 240) -> int:
    return start(argv, log).wait(timeout)


def last_round(root: Path) -> int:
    metrics = list((root / "reports").glob("R*.metrics.jsonl"))
    if not metrics:
        return -1
    lines = [line for line in metrics[0].read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["round"] if lines else -1


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def model_of(root: Path) -> dict:
    return torch.load(next((root / "reports").glob("R*.model.pt")), weights_only=True)


def history_of(root: Path) -> list[dict]:
    path = next(p for p in (root / "reports").glob("R*.metrics.jsonl") if p.name.count(".") == 2)
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = model_of(a), model_of(b)
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key
    assert history_of(a) == history_of(b)


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_kill_9_then_resume_ends_bit_identical(tmp_path, engine):
    argv = SLOW + ENGINES[engine] + units(tmp_path) + ["--rounds", "240" if engine in ("entire", "sequential") else "120"]
    assert run_to_end(argv + ["--output_root", str(tmp_path / "whole")], tmp_path / "whole.log") == 0
    victim = start(argv + ["--output_root", str(tmp_path / "cut")], tmp_path / "cut.log")
    stop_at = random.Random(engine).randrange(15, 60)
    wait_until(lambda: last_round(tmp_path / "cut") >= stop_at, 120, f"round {stop_at}")
    os.killpg(victim.pid, signal.SIGKILL)  # the run and its workers, no chance to clean up
    victim.wait(10)
    head = read_report(next((tmp_path / "cut" / "reports").glob("R*.txt")))
    assert head["status"] == "died"  # a hard kill leaves "alive" behind; readers see the lock is free ...
    assert run_to_end(argv + ["--output_root", str(tmp_path / "cut"), "--resume"], tmp_path / "cut.log") == 0
    report = next((tmp_path / "cut" / "reports").glob("R*.txt")).read_text()
    assert "had died without closing its report" in report and "Resumed at round" in report  # ... recovered
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


@pytest.mark.slow
def test_sigterm_checkpoints_reports_interrupted_and_resumes(tmp_path):
    argv = SLOW + ENGINES["sequential"] + units(tmp_path) + ["--rounds", "200", "--checkpoint_every", "50"]
    assert run_to_end(argv + ["--output_root", str(tmp_path / "whole")], tmp_path / "whole.log") == 0
    victim = start(argv + ["--output_root", str(tmp_path / "cut")], tmp_path / "cut.log")
    wait_until(lambda: last_round(tmp_path / "cut") >= 20, 120, "round 20")
    victim.send_signal(signal.SIGTERM)
    assert victim.wait(60) == 130
    head = read_report(next((tmp_path / "cut" / "reports").glob("R*.txt")))
    assert head["status"] == "interrupted" and "SIGTERM" in head["status_detail"]
    checkpoints = list((tmp_path / "cut" / "checkpoints").glob("R*/round_*.pt"))
    assert len(checkpoints) == 1 and int(checkpoints[0].stem.split("_")[1]) >= 20  # the signal's own checkpoint
    assert run_to_end(argv + ["--output_root", str(tmp_path / "cut"), "--resume", "auto"], tmp_path / "cut.log") == 0
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


@pytest.mark.slow
def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    argv = SLOW + ENGINES["sequential"] + units(tmp_path) + ["--rounds", "40"]
    assert run_to_end(argv + ["--output_root", str(tmp_path / "whole")], tmp_path / "whole.log") == 0
    victim = start(argv + ["--output_root", str(tmp_path / "cut"), "--rounds", "400"], tmp_path / "cut.log")
    wait_until(lambda: last_round(tmp_path / "cut") >= 20, 120, "round 20")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(10)
    newest, older = sorted((tmp_path / "cut" / "checkpoints").glob("R*/round_*.pt"), reverse=True)
    newest.write_bytes(newest.read_bytes()[:len(newest.read_bytes()) // 2])
    # the interrupted run had --rounds 400: a run id of its own; resume it by id with the same settings
    cut_argv = argv + ["--output_root", str(tmp_path / "cut"), "--rounds", "400"]
    assert run_to_end(cut_argv + ["--resume"], tmp_path / "cut.log") == 0
    report = next((tmp_path / "cut" / "reports").glob("R*.txt")).read_text()
    assert f"Resumed at round {int(older.stem.split('_')[1])}" in report and "checksum mismatch" in report


def test_two_identical_runs_one_is_refused_and_the_other_stays_clean(tmp_path):
    argv = SLOW + units(tmp_path) + ["--rounds", "1500", "--output_root", str(tmp_path)]
    first = start(argv, tmp_path / "first.log")
    wait_until(lambda: last_round(tmp_path) >= 0, 60, "the first run to start")
    second = subprocess.run([sys.executable, str(PROJECT / "dol1.py"), *argv], capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 3
    assert f"pid {first.pid}" in second.stderr and "is already running" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert first.wait(180) == 0
    reports = sorted(p.name for p in (tmp_path / "reports").glob("R*.txt"))
    assert len(reports) == 1  # nothing archived, nothing written by the refused run
    rounds = [r["round"] for r in history_of(tmp_path)]
    assert rounds == sorted(set(rounds)) and rounds[-1] == 1500
    assert read_report(tmp_path / "reports" / reports[0])["pid"] == first.pid


def test_identity_ignores_placement_and_follows_units_text_and_tag(tmp_path):
    H = dol1.resolve_config(TINY)
    base = experiment_id(H, "- Working_memory_usage\n")
    moved = {**H, "cuda_core": 3, "output_root": "/elsewhere", "data_root": "/data", "n_workers": 4,
             "checkpoint_every": 0, "resume": "auto", "units_file": "/x/Units.txt"}
    assert experiment_id(moved, "- Working_memory_usage\n") == base
    assert experiment_id(H, "- Working_memory_usage tol=1e-3\n") != base
    assert experiment_id({**H, "tag": "repeat-2"}, "- Working_memory_usage\n") != base
    assert experiment_id({**H, "step_size": 0.02}, "- Working_memory_usage\n") != base


def test_resume_without_checkpoint_is_bad_input_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + units(tmp_path) + ["--output_root", str(tmp_path / "out"), "--resume"])
    assert info.value.code == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_with_changed_settings_is_refused_naming_the_keys(tmp_path, capsys):
    out = ["--output_root", str(tmp_path / "out")]
    dol1.main(TINY + units(tmp_path) + out + ["--rounds", "40", "--checkpoint_every", "2",
                                              "--target_value", "0.0", "--target_monitor", "loss"])
    capsys.readouterr()
    first = json.loads(next((tmp_path / "out" / "reports").glob("R*.config.json")).read_text())["run_id"]
    for resume in ("yes", first):
        with pytest.raises(SystemExit) as info:
            dol1.main(TINY + units(tmp_path) + out + ["--rounds", "40", "--step_size", "0.05", "--resume", resume])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "step_size" in err and "target_monitor" in err


def test_a_stopped_run_cannot_be_resumed_and_auto_starts_afresh(tmp_path, capsys):
    argv = TINY + units(tmp_path) + ["--output_root", str(tmp_path)]
    first = dol1.main(argv)
    with pytest.raises(SystemExit) as info:
        dol1.main(argv + ["--resume"])
    assert info.value.code == 2 and "finished already" in capsys.readouterr().err
    again = dol1.main(argv + ["--resume", "auto"])
    assert again.run_id == first.run_id and (tmp_path / "reports" / f"{first.run_id}.1.txt").exists()


def test_output_root_that_is_a_file_or_unwritable_is_bad_input(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + units(tmp_path) + ["--output_root", str(blocker / "out")])
    assert info.value.code == 2 and "is a file" in capsys.readouterr().err

    import src.reporting as runs

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(runs.tempfile, "TemporaryFile", refuse)  # root may write anywhere: simulate a read-only disk
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + units(tmp_path) + ["--output_root", str(tmp_path / "ro")])
    assert info.value.code == 2 and "Permission denied" in capsys.readouterr().err
    assert not (tmp_path / "ro").exists()


def test_single_process_modes_are_refused_under_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for mode in ("blockwise_sequential",):  # entire runs data-parallel under torchrun (tests/test_ddp.py)
        with pytest.raises(SystemExit) as info:
            dol1.main(TINY + units(tmp_path) + ["--output_root", str(tmp_path), "--training_mode", mode])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "WORLD_SIZE=2" in err and "'entire'" in err
    assert not (tmp_path / "reports").exists()


def test_config_file_reruns_the_experiment_exactly_and_load_run_reopens_it(tmp_path):
    frame = dol1.main(TINY + units(tmp_path, "- Working_memory_usage\n") + ["--output_root", str(tmp_path / "a")])
    config = tmp_path / "a" / "reports" / f"{frame.run_id}.config.json"
    record = json.loads(config.read_text())
    assert record["units_text"] == "- Working_memory_usage\n"
    for key in ("argv", "torch_threads", "host", "torch", "numpy", "python", "git"):
        assert key in record["reproducibility"], key
    (tmp_path / "Units.txt").write_text("- NonFiniteStopper\n")  # the recorded units text is used, not this
    again = dol1.main(["--settings_file", str(config), "--output_root", str(tmp_path / "b")])
    assert again.run_id == frame.run_id
    for key, value in frame.center_model.state_dict().items():
        assert torch.equal(value, again.center_model.state_dict()[key]), key

    loaded = load_run(frame.run_id, tmp_path / "a")
    assert loaded.settings == frame.H and loaded.status["status"] == "finished"
    assert [r["round"] for r in loaded.history] == [r["round"] for r in frame.history]
    for key, value in frame.center_model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    assert loaded.checkpoint is not None and loaded.checkpoint["round"] == 8
    assert load_run(tmp_path / "a" / "reports" / f"{frame.run_id}.txt").run_id == frame.run_id


def test_measure_only_measures_the_saved_model(tmp_path):
    frame = dol1.main(TINY + units(tmp_path, "- Working_memory_usage\n") + ["--output_root", str(tmp_path),
                                                                           "--measurement_sampling_rate", "6"])
    log = tmp_path / "measurements" / f"Working_memory_usage_{frame.run_id}.jsonl"
    before = log.read_text().splitlines()
    assert [json.loads(line)["round"] for line in before] == [6, 12]
    dol1.main(["--measure_only", frame.run_id, "--output_root", str(tmp_path), "--units_file",
               str(tmp_path / "Units.txt")])
    after = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(after) == len(before) + 1 and after[-1]["measure_only"] is True and after[-1]["round"] == 12


def interrupted_then_resumed(tmp_path: Path, extra: list[str], at: int) -> tuple:
    """Run to the end in one root; in another, stop (as SIGTERM would) at round ``at`` and resume."""
    from tests_helpers_interrupt import install
    argv = TINY + units(tmp_path, "- Working_memory_usage") + ["--measurement_sampling_rate", "2"] + extra
    whole = dol1.main(argv + ["--output_root", str(tmp_path / "whole")])
    with install(at):
        with pytest.raises(SystemExit) as info:
            dol1.main(argv + ["--output_root", str(tmp_path / "cut")])
    assert info.value.code == 130
    return whole, dol1.main(argv + ["--output_root", str(tmp_path / "cut"), "--resume"])


def test_resume_keeps_the_measurements_logged_before_the_checkpoint(tmp_path):
    whole, resumed = interrupted_then_resumed(tmp_path, [], at=7)
    logs = [tmp_path / root / "measurements" / f"Working_memory_usage_{whole.run_id}.jsonl" for root in ("whole", "cut")]
    rounds = [[json.loads(line)["round"] for line in log.read_text().splitlines()] for log in logs]
    assert rounds[0] == rounds[1] == [2, 4, 6, 8, 10, 12]


def test_an_interrupt_in_the_last_round_is_checkpointed_and_resumable(tmp_path):
    whole, resumed = interrupted_then_resumed(tmp_path, [], at=12)
    assert read_report(resumed.reporter.path)["status"] == "finished" and resumed.round == 12
    for key, value in whole.center_model.state_dict().items():
        assert torch.equal(value, resumed.center_model.state_dict()[key]), key


def test_a_fresh_rerun_archives_checkpoints_and_model_and_refuses_foreign_checkpoints(tmp_path, capsys):
    argv = TINY + units(tmp_path) + ["--output_root", str(tmp_path)]
    first = dol1.main(argv)
    folder = tmp_path / "checkpoints" / first.run_id
    assert [p.name for p in sorted(folder.glob("*.pt"))] == ["round_00000004.pt", "round_00000008.pt"]
    dol1.main(argv)  # a fresh attempt of the same id: the earlier one's files are moved aside, not reused
    assert (tmp_path / "checkpoints" / f"{first.run_id}.1").is_dir()
    assert (tmp_path / "reports" / f"{first.run_id}.model.1.pt").exists()
    other = dol1.main(TINY + units(tmp_path) + ["--output_root", str(tmp_path / "other"), "--seed", "5"])
    foreign = tmp_path / "other" / "checkpoints" / other.run_id / "round_00000008.pt"
    for stale in folder.glob("*.pt"):
        stale.unlink()
    (folder / "round_00000008.pt").write_bytes(foreign.read_bytes())
    (tmp_path / "reports" / f"{first.run_id}.status.json").write_text(json.dumps(
        {"run_id": first.run_id, "status": "interrupted", "pid": 1}))
    with pytest.raises(SystemExit) as info:
        dol1.main(argv + ["--resume"])
    assert info.value.code == 2 and f"a checkpoint of run {other.run_id}, not of {first.run_id}" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_to_the_process_group_of_a_multiprocess_run_is_an_interruption(tmp_path):
    argv = SLOW + ENGINES["multiprocess"] + units(tmp_path) + ["--rounds", "100000", "--checkpoint_every", "1000",
                                                               "--output_root", str(tmp_path)]
    proc = start(argv, tmp_path / "run.log")
    wait_until(lambda: last_round(tmp_path) >= 10, 120, "round 10")
    os.killpg(proc.pid, signal.SIGTERM)  # as Slurm and torchrun stop a job: every process of the group
    assert proc.wait(60) == 130
    head = read_report(next((tmp_path / "reports").glob("R*.txt")))
    assert head["status"] == "interrupted" and "SIGTERM" in head["status_detail"] and "resumable" in \
        head["status_detail"]
    assert list((tmp_path / "checkpoints").glob("R*/round_*.pt"))
