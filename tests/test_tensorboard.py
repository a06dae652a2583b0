"""TensorBoard event files (``--tensorboard true``), read back with TensorBoard's own EventAccumulator: every progress
record and schedule value, the measurement units' numbers, coupling and heat-maps, the hyper-parameters; and
nothing imported or written when off."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dol1
from src.Runs import tensorboard as tensorboard_log
from src.cli import ConfigError

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

ROOT = Path(dol1.__file__).resolve().parent
SMALL = ["--model", "mlp", "--config", "[8]", "--dataset_name", "digits_flat", "--cuda_core", "-1",
         "--batch_size", "32", "--checkpoint_every", "0"]
UNITS = ("- Working_memory_usage\n"
         "- HessianBlockInteractionMeasurement batch_size=32 dtype=float64\n"
         "- LearningRateSchedule scheduler=StepLR step_size=3 gamma=0.5\n")


def events(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def f32(value):
    """TensorBoard stores a scalar as float32: the exact reference is the float64 value rounded to float32."""
    return float(np.float32(value))


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensorboard")
    units = root / "Units.txt"
    units.write_text(UNITS)
    frame = dol1.main(SMALL + ["--training_mode", "blockwise_sequential", "--rounds", "6", "--report_sampling_rate",
                               "2", "--measurement_sampling_rate", "3", "--units_file", str(units),
                               "--output_root", str(root), "--tensorboard", "true", "--step_size", "0.01"])
    (folder,) = (root / "tensorboard").iterdir()
    return frame, folder, events(folder)


def test_every_progress_record_and_schedule_value_is_a_scalar(logged_run):
    frame, folder, acc = logged_run
    assert folder.name == frame.run_id
    assert [r["round"] for r in frame.history] == [0, 2, 4, 6]
    for key in ("loss", "accuracy", "test_loss", "test_accuracy", "steps", "samples", "deviation", "bytes_sent"):
        logged = [(e.step, e.value) for e in acc.Scalars(f"progress/{key}")]
        assert logged == [(r["round"], f32(r[key])) for r in frame.history], key
    lr = [(e.step, e.value) for e in acc.Scalars("schedule/lr")]
    assert lr == [(0, f32(0.01)), (2, f32(0.01)), (4, f32(0.005)), (6, f32(0.005))]  # StepLR halves at round 3
    assert [e.value for e in acc.Scalars("schedule/lr_blocks/1")] == [f32(r["lr_blocks"][1]) for r in frame.history]
    assert [e.value for e in acc.Scalars("schedule/K")] == [1.0] * 4
    assert "progress/round" not in acc.Tags()["scalars"]


def test_measurements_coupling_and_heatmaps(logged_run):
    frame, _, acc = logged_run
    log = frame.paths.measurements / f"HessianBlockInteractionMeasurement_{frame.run_id}.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["round"] for r in records] == [3, 6]
    coupling = [(e.step, e.value) for e in acc.Scalars("coupling/HessianBlockInteractionMeasurement/0_1")]
    assert coupling == [(r["round"], f32(r["coupling"][0][1])) for r in records]
    hvps = [(e.step, e.value) for e in acc.Scalars("measurements/HessianBlockInteractionMeasurement/hvps")]
    assert hvps == [(r["round"], f32(r["hvps"])) for r in records]
    memory = frame.paths.measurements / f"Working_memory_usage_{frame.run_id}.jsonl"
    totals = [json.loads(line)["total_MB"] for line in memory.read_text().splitlines()]
    assert [e.value for e in acc.Scalars("measurements/Working_memory_usage/total_MB")] == [f32(t) for t in totals]
    for stem in ("block_offdiag_eig_heatmap", "block_coupling_heatmap"):
        images = acc.Images(f"heatmaps/HessianBlockInteractionMeasurement/{stem}")
        assert [i.step for i in images] == [3, 6]
        assert images[0].encoded_image_string.startswith(b"\x89PNG") and images[0].width > 100


def test_hparams_with_final_metrics(logged_run):
    frame, _, acc = logged_run
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["model"].string_value == "mlp" and hp["rounds"].number_value == 6
    assert hp["config"].string_value == "[8]" and hp["run_id"].string_value == frame.run_id
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"final/test_accuracy", "final/loss", "final/samples"} <= metric_tags
    last = frame.history[-1]
    assert [(e.step, e.value) for e in acc.Scalars("final/test_accuracy")] == [(6, f32(last["test_accuracy"]))]


def test_a_fresh_attempt_moves_the_earlier_events_aside(tmp_path):
    args = SMALL + ["--training_mode", "entire", "--rounds", "2", "--measurement_sampling_rate", "0",
                    "--output_root", str(tmp_path), "--tensorboard", "true"]
    frame = dol1.main(args)
    dol1.main(args)
    folders = sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    assert folders == [frame.run_id, f"{frame.run_id}.1"]
    for name in folders:
        assert [e.step for e in events(tmp_path / "tensorboard" / name).Scalars("progress/loss")] == [0, 2]


def test_off_by_default_imports_and_writes_nothing(tmp_path):
    code = ("import sys, dol1; dol1.main(sys.argv[1:]); "
            "print('IMPORTED', sorted(m for m in sys.modules if 'tensorboard' in m))")
    out = subprocess.run([sys.executable, "-c", code] + SMALL + ["--training_mode", "entire", "--rounds", "2",
                                                                 "--measurement_sampling_rate", "0",
                                                                 "--output_root", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout  # neither the wing's module nor tensorboard itself
    assert (tmp_path / "reports").is_dir() and not (tmp_path / "tensorboard").exists()


def test_missing_tensorboard_is_bad_input(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="--tensorboard true needs the tensorboard package"):
        dol1.resolve_config(SMALL + ["--tensorboard", "true"], raise_errors=True)
    dol1.resolve_config(SMALL, raise_errors=True)  # off: not even looked for


@pytest.mark.parametrize("value, tags", [
    ({"a": 1, "b": [2.0, 3], "c": {"d": 4}}, [("x/a", 1.0), ("x/b/0", 2.0), ("x/b/1", 3.0), ("x/c/d", 4.0)]),
    ({"nan": float("nan"), "flag": True, "text": "s", "none": None, "matrix": [[1, 2]]}, []),
])
def test_numbers_flattens_what_is_a_scalar(value, tags):
    assert list(tensorboard_log.numbers("x", value)) == tags
