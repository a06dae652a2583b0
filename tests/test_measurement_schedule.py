"""Measurement schedules: log-spaced and listed rounds next to measurement_sampling_rate, bad values refused before
any work, and the same rounds after a resume."""
import ast
import json

import pytest

import dol1
from src.Buliding_Units.measurement_schedule import log_rounds, parse_measurement_rounds, scheduled_rounds
from src.Buliding_Units.MeasurementUnit import MeasurementUnit

TINY = ["--model", "mlp", "--config", "[6]", "--dataset_name", "digits_flat", "--rounds", "12", "--batch_size", "32",
        "--report_sampling_rate", "4", "--cuda_core", "-1", "--eval_samples", "128", "--checkpoint_every", "4"]


class Counter(MeasurementUnit):
    """Test plugin: records the rounds at which it was called, and the samples trained by then."""

    def measure(self, frame):
        return {"seen": frame.round, "samples": frame.samples}


def run_counter(tmp_path, *flags, root="out"):
    units = tmp_path / "Units.txt"
    units.write_text("- test_measurement_schedule.Counter\n")
    argv = TINY + ["--units_file", str(units), "--output_root", str(tmp_path / root), *flags]
    return argv


def logged_rounds(root, frame):
    log = root / "measurements" / f"Counter_{frame.run_id}.jsonl"
    return [json.loads(line)["round"] for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("total, expected", [(0, [0]), (1, [0, 1]), (3, [0, 1, 3]), (12, [0, 1, 3, 10, 12]),
                                             (120, [0, 1, 3, 10, 30, 100, 120]),
                                             (1000, [0, 1, 3, 10, 30, 100, 300, 1000])])
def test_log_rounds(total, expected):
    assert log_rounds(total) == expected
    assert parse_measurement_rounds("log", total) == expected


@pytest.mark.parametrize("spec", [None, "", []])
def test_no_listed_rounds(spec):
    assert parse_measurement_rounds(spec, 10) == []


@pytest.mark.parametrize("flags, expected", [
    (["--measurement_rounds", "log", "--measurement_sampling_rate", "0"], [0, 1, 3, 10, 12]),
    (["--measurement_rounds", "[5, 0, 5]", "--measurement_sampling_rate", "4"], [0, 4, 5, 8, 12]),
    (["--measurement_rounds", "[12]", "--measurement_sampling_rate", "0"], [12]),
    (["--measurement_sampling_rate", "5"], [5, 10, 12]),
    (["--measurement_sampling_rate", "0"], []),
])
def test_measured_rounds(tmp_path, flags, expected):
    argv = run_counter(tmp_path, *flags)
    frame = dol1.main(argv)
    assert logged_rounds(tmp_path / "out", frame) == expected == scheduled_rounds(frame.H)
    if expected and expected[0] == 0:  # round 0 is the model before training
        log = tmp_path / "out" / "measurements" / f"Counter_{frame.run_id}.jsonl"
        assert json.loads(log.read_text().splitlines()[0])["samples"] == 0


@pytest.mark.parametrize("value, named", [("often", "'often'"), ("[-1, 3]", "[-1]"), ("[3, 13]", "[13]"),
                                          ("[1.5]", "[1.5]"), ("5", "5"), ("[True]", "[True]")])
def test_bad_measurement_rounds_exit_2_before_any_work(tmp_path, capsys, value, named):
    argv = run_counter(tmp_path, "--measurement_rounds", value)
    with pytest.raises(SystemExit) as info:
        dol1.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--measurement_rounds" in err and named in err and "'log'" in err and "[0, 12]" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


def test_a_resumed_run_measures_the_same_rounds(tmp_path):
    from tests_helpers_interrupt import install
    flags = ["--measurement_rounds", "log", "--measurement_sampling_rate", "0"]
    whole = dol1.main(run_counter(tmp_path, *flags, root="whole"))
    with install(7):
        with pytest.raises(SystemExit) as info:
            dol1.main(run_counter(tmp_path, *flags, root="cut"))
    assert info.value.code == 130
    assert logged_rounds(tmp_path / "cut", whole) == [0, 1, 3]
    resumed = dol1.main(run_counter(tmp_path, *flags, root="cut") + ["--resume"])
    assert resumed.run_id == whole.run_id
    assert logged_rounds(tmp_path / "cut", resumed) == logged_rounds(tmp_path / "whole", whole) == [0, 1, 3, 10, 12]


@pytest.mark.parametrize("total", [1, 3, 7, 500])
def test_the_example_in_the_error_message_is_itself_valid(total):
    """The message offered 'such as [0, 10, 20]' for a 3-round run, where 10 and 20 are out of range."""
    with pytest.raises(ValueError) as info:
        parse_measurement_rounds("garbage", total)
    example = ast.literal_eval(str(info.value).rsplit("such as ", 1)[1])
    assert parse_measurement_rounds(example, total) == example and len(example) >= 2
