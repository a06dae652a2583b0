"""Everything registered in a table is tested just by being registered: every engine trains and logs, every plugin
constructs from its defaults and measures or checks once; engines plug in by decorator or by dotted path."""
import json
import sys

import pytest
import torch

import dol1
from src.Buliding_Units.plugins import available_plugins
from src.Buliding_Units.ScheduleUnit import ScheduleUnit
from src.Buliding_Units.StopperUnit import StopperUnit
from src.Optimizer_Engines import ENGINES, engine_table, register_engine, resolve_engine
from src.Optimizer_Engines.BCD_engine import train_blockwise_sequential
from src.reporting import read_report

TINY = ["--model", "mlp", "--config", "[6, 5]", "--dataset_name", "digits_flat", "--rounds", "4", "--batch_size", "16",
        "--report_sampling_rate", "2", "--cuda_core", "-1", "--measurement_sampling_rate", "0", "--n_workers", "2"]


def empty_units(tmp_path):
    f = tmp_path / "Units.txt"
    f.write_text("# no plugins\n")
    return str(f)


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(engine_table()))
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
    frame = dol1.build(H, resolve_engine(H["training_mode"]))
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
    assert "test_block_sweeps" in engine_table()


def test_decorated_module_in_the_package_appears_in_table_and_help(tmp_path, monkeypatch, capsys):
    import src.Optimizer_Engines as package
    (tmp_path / "my_test_engine.py").write_text(
        "from src.Optimizer_Engines import register_engine\n"
        "from src.Optimizer_Engines.BCD_engine import entire_step\n"
        "from src.Optimizer_Engines.loop import training_loop\n\n\n"
        "@register_engine('my_entire')\n"
        "def train_my_entire(frame, progress=None):\n"
        "    \"\"\"Entire training, registered by a module dropped into the package.\"\"\"\n"
        "    return training_loop(frame, entire_step, progress)\n")
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    try:
        assert "my_entire" in engine_table()
        with pytest.raises(SystemExit) as exit_info:
            dol1.main(["--help"])
        assert exit_info.value.code == 0
        assert "my_entire (Entire training, registered by a module dropped into the" in \
            " ".join(capsys.readouterr().out.split())
        frame = dol1.main(TINY + ["--training_mode", "my_entire", "--output_root", str(tmp_path),
                                  "--units_file", empty_units(tmp_path)])
        assert frame.steps == 4 and frame.H["training_mode"] == "my_entire"
    finally:
        ENGINES.pop("my_entire", None)
        sys.modules.pop("src.Optimizer_Engines.my_test_engine", None)


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


def test_register_engine_refuses_a_taken_name():
    with pytest.raises(ValueError, match="taken by"):
        register_engine("entire")(lambda frame: frame)


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
