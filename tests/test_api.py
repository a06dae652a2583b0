"""The notebook API: ``dol1.run(**settings)`` trains like the command line with the same settings, refuses bad
keywords with the command line's own messages (as ConfigError, without exiting), and ``dol1.load_run`` reopens
the run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dol1
from src.cli import ConfigError, settings_argv

ROOT = Path(dol1.__file__).resolve().parent
SETTINGS = dict(model="mlp", config=[16], dataset_name="digits_flat", training_mode="entire", rounds=8,
                report_sampling_rate=4, measurement_sampling_rate=0, batch_size=32, cuda_core=-1, step_size=0.02)
TIMINGS = ("wall_time", "compute_time", "communication_time", "compute_time_share", "train_time", "measure_time",
           "eval_time")


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return root, dol1.run(**SETTINGS, output_root=root)


def test_run_equals_the_command_line(notebook_run, tmp_path):
    root, frame = notebook_run
    assert frame.round == 8 and [r["round"] for r in frame.history] == [0, 4, 8]
    argv = [sys.executable, "dol1.py", "--model", "mlp", "--config", "[16]", "--dataset_name", "digits_flat",
            "--training_mode", "entire", "--rounds", "8", "--report_sampling_rate", "4",
            "--measurement_sampling_rate", "0", "--batch_size", "32", "--cuda_core", "-1", "--step_size", "0.02",
            "--output_root", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # bit-identical only at equal threads
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    (metrics,) = (tmp_path / "reports").glob("R*.metrics.jsonl")
    assert metrics.name == f"{frame.run_id}.metrics.jsonl"  # the same experiment, the same run id
    cli = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert without_timings(frame.history) == without_timings(cli)
    assert frame.history[-1]["loss"] < frame.history[0]["loss"]  # it trained


def test_load_run_reopens_the_run(notebook_run):
    root, frame = notebook_run
    record = dol1.load_run(frame.run_id, root)
    assert record.status["status"] == "finished" and record.settings["rounds"] == 8
    assert without_timings(record.history) == without_timings(frame.history)
    for key, value in frame.center_model.state_dict().items():
        assert torch.equal(record.model.state_dict()[key], value), key


@pytest.mark.parametrize("bad, named", [
    (dict(roundz=5), "unrecognized arguments: --roundz=5"),
    (dict(rounds=1.5), "argument --rounds: expected int for --rounds, got '1.5'"),
    (dict(model="nope"), "--model 'nope' is not valid"),
    (dict(K=0), "--K must be >= 1, got 0"),
    (dict(step_size=float("nan")), "expected float (an int is accepted) for --step_size, got 'nan'"),
    (dict(help=True), "argument -h/--help: ignored explicit argument 'True'"),
])
def test_bad_keyword_raises_the_command_lines_message(bad, named, tmp_path, capsys):
    with pytest.raises(ConfigError) as info:
        dol1.run(**{**SETTINGS, **bad, "output_root": tmp_path})
    assert named in str(info.value)
    with pytest.raises(SystemExit) as exit_info:  # the command line with the same settings: exit 2, same message
        dol1.main(settings_argv({**SETTINGS, **bad, "output_root": tmp_path}))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"dol1.py: error: {info.value}\n"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_settings_argv_writes_literals():
    assert settings_argv({"config": [8, 8], "tag": "a b", "output_root": Path("/x"), "target_value": None,
                          "deterministic": True, "step_size": torch.tensor(0.5, dtype=torch.float64)}) == [
        "--config=[8, 8]", "--tag=a b", "--output_root=/x", "--target_value=None", "--deterministic=True",
        "--step_size=0.5"]


def test_a_deterministic_run_leaves_the_next_run_of_the_notebook_as_it_asked(tmp_path):
    """run(deterministic=True) switched torch's deterministic algorithms on for the whole process: the next run(...)
    without it ran deterministic too while its report and config said deterministic false."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    dol1.run(**{**SETTINGS, "rounds": 1, "deterministic": True, "output_root": tmp_path})
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before
