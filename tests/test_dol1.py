"""dol1.py end to end: bad input, report statuses, stoppers, figures, and the default run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dol1
from src.Buliding_Units.MeasurementUnit import MeasurementUnit
from src.reporting import read_report

ROOT = Path(dol1.__file__).resolve().parent
TINY = ["--model", "mlp", "--config", "[16]", "--dataset_name", "digits_flat", "--rounds", "6", "--batch_size", "32",
        "--report_sampling_rate", "2", "--measurement_sampling_rate", "0", "--cuda_core", "-1"]


class Boom(MeasurementUnit):
    """Test plugin: raises in measure."""

    def measure(self, frame):
        raise RuntimeError("plugin exploded")


class CtrlC(MeasurementUnit):
    """Test plugin: behaves like Ctrl-C during the run."""

    def measure(self, frame):
        raise KeyboardInterrupt


def units_file(tmp_path, *lines):
    f = tmp_path / "Units.txt"
    f.write_text("\n".join(lines) + "\n")
    return str(f)


def only_report(tmp_path):
    reports = [p for p in (tmp_path / "reports").glob("R*.txt")]
    assert len(reports) == 1
    return reports[0]


@pytest.mark.parametrize("argv, needles", [
    (["--model", "nope"], ["--model", "'nope'", "residual_cnn"]),
    (["--dataset_name", "nope"], ["--dataset_name", "digits"]),
    (["--training_mode", "asynch"], ["--training_mode", "blockwise_sequential", "Did you mean 'async'"]),
    (["--K", "0"], ["--K", "0"]),
    (["--rounds", "-1"], ["--rounds", "-1"]),
    (["--active_share", "0"], ["--active_share", "(0, 1]"]),
    (["--active_share", "1.5"], ["--active_share", "1.5"]),
    (["--config", "[[8, 8], [4]]", "--model", "mlp"], ["--config", "mlp"]),
    (["--config", "[8, 8]", "--model", "cnn_ensemble"], ["--config", "cnn_ensemble"]),
    (["--config", "[]"], ["--config"]),
    (["--optimizer", "lbfgs"], ["--optimizer", "adam", "sgd"]),
    (["--training_mode", "blockwise", "--block_update", "gauss_seidel"], ["gauss_seidel", "blockwise_sequential"]),
    (["--early_stop_patience", "2", "--early_stop_monitor", "nope"], ["nope", "test_loss"]),
    (["--bogus", "1"], ["--bogus"]),
    (["--rounds", "0.5"], ["--rounds", "int"]),
])
def test_bad_input_exits_2_before_any_report(tmp_path, capsys, argv, needles):
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + ["--output_root", str(tmp_path)] + argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err
    assert not (tmp_path / "reports").exists()


def test_bad_units_file_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", units_file(tmp_path, "- Nope")])
    assert info.value.code == 2 and "Nope" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def test_finished_run_writes_report_metrics_and_curve(tmp_path):
    frame = dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", units_file(tmp_path, "")])
    report = only_report(tmp_path)
    head = read_report(report)
    assert head["status"] == "finished" and head["H"] == frame.H
    assert head["run_info"]["device"] == "cpu" and head["run_info"]["n_blocks"] == 2
    text = report.read_text()
    assert "Round 6: Energy = " in text and "Test Accuracy = " in text
    metrics = tmp_path / "reports" / f"{frame.run_id}.metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 2, 4, 6]
    assert records[-1]["test_accuracy"] == frame.history[-1]["test_accuracy"]
    assert (tmp_path / "figures" / f"training_curve_{frame.run_id}.pdf").stat().st_size > 0
    assert (tmp_path / "figures" / f"training_curve_{frame.run_id}.png").stat().st_size > 0


def test_plugin_failure_marks_report_failed(tmp_path):
    f = units_file(tmp_path, "- test_dol1.Boom")
    with pytest.raises(RuntimeError, match="plugin exploded"):
        dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", f, "--measurement_sampling_rate", "2"])
    report = only_report(tmp_path)
    assert read_report(report)["status"] == "failed"
    assert "plugin exploded" in report.read_text() and "Traceback" in report.read_text()


def test_interrupt_marks_report_interrupted(tmp_path):
    f = units_file(tmp_path, "- test_dol1.CtrlC")
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", f, "--measurement_sampling_rate", "2"])
    assert info.value.code == 130
    assert read_report(only_report(tmp_path))["status"] == "interrupted"


def test_target_stopper_from_keys_stops_with_reason(tmp_path):
    frame = dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", units_file(tmp_path, ""),
                              "--rounds", "200", "--target_monitor", "test_loss", "--target_value", "2.0"])
    head = read_report(only_report(tmp_path))
    assert head["status"] == "stopped" and "TargetStopper" in head["status_detail"]
    assert frame.round < 200 and frame.history[-1]["test_loss"] < 2.0


def test_stopper_from_units_file(tmp_path):
    f = units_file(tmp_path, "- EarlyStoppingStopper monitor=test_accuracy patience=1 min_delta=0.5")
    frame = dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", f, "--rounds", "40"])
    # checks at rounds 0 and 2; no jump of more than 0.5 in accuracy, patience 1: stop at the second check
    assert frame.round == 2 and "EarlyStoppingStopper" in frame.stop_reason


def test_non_finite_loss_stops_the_run(tmp_path):
    frame = dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", units_file(tmp_path, ""),
                              "--step_size", "1e30", "--optimizer", "sgd", "--rounds", "30"])
    head = read_report(only_report(tmp_path))
    assert head["status"] == "diverged" and "non" in head["status_detail"].lower()  # issue 15: its own status
    assert frame.round < 30


def test_seed_example_parses():
    H = dol1.resolve_config(["--training_mode", "blockwise", "--model", "cnn_ensemble", "--config",
                             "[[16,16],[32,32],[32,64]]", "--rounds", "2000"])
    assert H["config"] == [[16, 16], [32, 32], [32, 64]] and H["rounds"] == 2000


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as info:
        dol1.resolve_config(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for key in dol1.DEFAULTS:
        assert f"--{key}" in out
    assert "local steps per block per round" in out


def test_runs_from_another_folder(tmp_path):
    """`python /path/to/dol1.py` works from any working directory."""
    out = subprocess.run([sys.executable, str(ROOT / "dol1.py"), *TINY, "--rounds", "2",
                          "--output_root", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert "finished after 2 rounds" in out.stdout
    assert only_report(tmp_path / "out").exists()


@pytest.mark.slow
def test_default_run_reaches_098_offline_and_its_loss_never_rises_above_its_start(tmp_path):
    """The README's first command: no flags (but a private output folder), block-wise on digits."""
    frame = dol1.main(["--output_root", str(tmp_path)])
    assert frame.H["training_mode"] == "blockwise_sequential" and frame.H["dataset_name"] == "digits"
    assert frame.history[-1]["test_accuracy"] >= 0.98  # the default step size and rounds were chosen for this
    start = frame.history[0]["loss"]
    assert all(r["loss"] <= start for r in frame.history), "the default curve rises above its start"
    assert read_report(only_report(tmp_path))["status"] == "finished"
    assert list((tmp_path / "measurements").glob(f"*_{frame.run_id}.jsonl"))
