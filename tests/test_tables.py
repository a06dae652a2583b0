"""Everything registered in a table is tested just by being registered: every engine trains and logs, every plugin
constructs from its defaults and measures or checks once; engines plug in by a line in the table or by dotted path."""
import json
import sys

import pytest
import torch

import dol1
from src.Buliding_Units.plugins import available_plugins
from src.Buliding_Units.ScheduleUnit import ScheduleUnit
from src.Buliding_Units.StopperUnit import StopperUnit
from src.Optimizer_Engines import ENGINES, EngineSpec, resolve_engine
from src.Optimizer_Engines.BCD_engine import train_blockwise_sequential
from src.reporting import read_report

TINY = ["--model", "mlp", "--config", "[6, 5]", "--dataset_name", "digits_flat", "--rounds", "4", "--batch_size", "16",
        "--report_sampling_rate", "2", "--cuda_core", "-1", "--measurement_sampling_rate", "0", "--n_workers", "2"]


def empty_units(tmp_path):
    f = tmp_path / "Units.txt"
    f.write_text("# no plugins\n")
    return str(f)


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(ENGINES))
def test_every_engine_trains_a_tiny_model_and_logs(tmp_path, mode):
    frame = dol1.main(TINY + ["--training_mode", mode, "--output_root", str(tmp_path),
                              "--units_file", empty_units(tmp_path)])
    assert frame.round == 4 and [r["round"] for r in frame.history] == [0, 2, 4]
    assert frame.samples > 0 and frame.steps > 0
    head = read_report(frame.reporter.path)
    assert head["status"] == "finished" and head["H"]["training_mode"] == mode
    lines = frame.reporter.metrics_path.read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 2, 4]
    assert json.loads(frame.reporter.status_path.read_text())["status"] == "finished"


@pytest.mark.parametrize("name", sorted(available_plugins()))
def test_every_plugin_constructs_from_defaults_and_runs_once(tmp_path, name):
    cls = available_plugins()[name]
    unit = cls()
    if isinstance(unit, StopperUnit):
        record = {"round": 1, "loss": 1.0, "accuracy": 0.5, "test_loss": 1.0, "test_accuracy": 0.5}
        assert unit.check(record) in (True, False)
        assert isinstance(repr(unit), str)
        return
    H = dol1.resolve_config(TINY + ["--training_mode", "blockwise_sequential", "--rounds", "1",
                                    "--output_root", str(tmp_path)])
    frame = dol1.make_frame(H, resolve_engine(H["training_mode"]))
    if isinstance(unit, ScheduleUnit):
        unit.prepare(frame)
        changes = unit.at(frame, 0)
        assert isinstance(changes, dict) and changes and isinstance(repr(unit), str)
        return
    frame = train_blockwise_sequential(frame)
    unit.prepare(frame)
    record = unit.measure(frame)
    assert isinstance(record, dict) and record
    unit.log_measurement(frame, record)
    logged = (tmp_path / "measurements" / f"{name}_{frame.run_id}.jsonl").read_text().splitlines()
    assert len(logged) == 1 and json.loads(logged[0])["round"] == 1


def test_dotted_path_engine_runs_from_dol1(tmp_path):
    frame = dol1.main(TINY + ["--training_mode", "tests.engine_plugins.train_plain", "--output_root", str(tmp_path),
                              "--units_file", empty_units(tmp_path)])
    assert frame.H["_engine_ran"] == "train_plain"
    assert frame.round == 4 and frame.steps == 4 and not hasattr(frame, "distributed_models")
    assert read_report(frame.reporter.path)["status"] == "finished"


def test_decorated_engine_outside_the_package_keeps_its_spec(tmp_path):
    frame = dol1.main(TINY + ["--training_mode", "tests.engine_plugins.train_two_sweeps",
                              "--output_root", str(tmp_path), "--units_file", empty_units(tmp_path)])
    assert frame.round == 4 and len(frame.distributed_models) == 3  # block_copies=True from the decorator
    assert frame.steps == 4 * 2 * 3  # two block-wise passes per round, 3 blocks, K = 1
    spec = resolve_engine("tests.engine_plugins.train_two_sweeps")
    assert spec.block_copies and spec.block_updates == ("jacobi", "gauss_seidel")


def test_a_line_in_the_table_is_an_engine_listed_by_help(tmp_path, monkeypatch, capsys):
    """The README's recipe: one EngineSpec line in ENGINES; --help lists it without importing its module."""
    module = tmp_path / "my_test_engine.py"
    module.write_text(
        "from src.Optimizer_Engines.BCD_engine import entire_step\n"
        "from src.Optimizer_Engines.loop import training_loop\n\n\n"
        "def train_my_entire(frame, progress=None):\n"
        "    return training_loop(frame, entire_step, progress)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ENGINES, "my_entire", EngineSpec("my_entire", "my_test_engine.train_my_entire",
                                                         "entire training, from a line in the table"))
    try:
        with pytest.raises(SystemExit) as exit_info:
            dol1.main(["--help"])
        assert exit_info.value.code == 0
        assert "my_entire (entire training, from a line in the table)" in " ".join(capsys.readouterr().out.split())
        assert "my_test_engine" not in sys.modules  # --help imported no engine
        frame = dol1.main(TINY + ["--training_mode", "my_entire", "--output_root", str(tmp_path),
                                  "--units_file", empty_units(tmp_path)])
        assert frame.steps == 4 and frame.H["training_mode"] == "my_entire"
    finally:
        sys.modules.pop("my_test_engine", None)


@pytest.mark.parametrize("mode, fragment", [
    ("blockwise_sequentail", "Did you mean 'blockwise_sequential'?"),
    ("tests.engine_plugins.nope", "cannot import 'nope'"),
    ("tests.engine_plugins.__doc__", "is a str, not a Python function that takes a Frame"),
    ("os.getcwd", "not a Python function"),
    ("collections.OrderedDict", "is a class"),
    ("tests.engine_plugins.takes_nothing", "cannot be called with a Frame"),
    ("tests.engine_plugins.train_plian", "Did you mean tests.engine_plugins.train_plain?"),
    ("tests.broken_engine_module.train", "importing 'tests.broken_engine_module' failed: RuntimeError"),
    ("nosuchpackage.mod.train", "add your package's folder to PYTHONPATH"),
    (".tests.engine_plugins.train_plain", "is not valid"),
])
def test_bad_engines_exit_2_before_anything_is_written(tmp_path, capsys, mode, fragment):
    with pytest.raises(SystemExit) as exit_info:
        dol1.main(TINY + ["--training_mode", mode, "--output_root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def test_a_table_engine_named_by_its_dotted_path_is_the_table_engine():
    spec = resolve_engine("src.Optimizer_Engines.BCD_engine.train_blockwise_sequential")
    assert spec.name == "blockwise_sequential" and spec.block_copies and "gauss_seidel" in spec.block_updates


def test_the_table_names_modules_that_exist_and_functions_that_take_a_frame():
    for name, spec in ENGINES.items():
        loaded = resolve_engine(name)
        assert loaded.function.__name__ == spec.path.rpartition(".")[2] and loaded.summary


def test_readme_engine_recipe_trains_like_the_sequential_jacobi_engine(tmp_path):
    """The recipe in the README is a working engine: it matches blockwise_sequential (Jacobi) exactly."""
    common = TINY + ["--units_file", empty_units(tmp_path), "--K", "2", "--gamma", "0.5", "--active_share", "0.7"]
    ours = dol1.main(common + ["--training_mode", "tests.engine_plugins.train_readme_jacobi",
                               "--output_root", str(tmp_path / "a")])
    reference = dol1.main(common + ["--training_mode", "blockwise_sequential", "--output_root", str(tmp_path / "b")])
    for key, value in reference.center_model.state_dict().items():
        assert torch.equal(value, ours.center_model.state_dict()[key]), key
    counters = ("steps", "samples", "block_updates", "forward_sample_passes", "backward_sample_passes")
    assert [getattr(ours, k) for k in counters] == [getattr(reference, k) for k in counters] and ours.steps > 0
