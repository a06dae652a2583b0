"""The README's extension recipes, executed word for word: each code block marked ``<!-- recipe: name -->`` is run
where the recipe says it goes (a new module, the engine table, MeasurementUnit.py, StopperUnit.py, the MODELS table,
the DATASETS table), then used by ``dol1.main`` as a user would."""
import contextlib
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import dol1
from src.Architectures import Models
from src.Buliding_Units import MeasurementUnit, StopperUnit
from src.Data import datasets
from src.Optimizer_Engines import ENGINES

ROOT = Path(__file__).resolve().parents[1]
ENGINE_TABLE = ROOT / "src" / "Optimizer_Engines" / "__init__.py"
TINY = ["--model", "mlp", "--config", "[6, 5]", "--dataset_name", "digits_flat", "--rounds", "4", "--batch_size", "16",
        "--report_sampling_rate", "2", "--cuda_core", "-1", "--measurement_sampling_rate", "2", "--checkpoint_every",
        "0", "--eval_samples", "128"]


def recipe(name: str) -> str:
    """The code block that follows ``<!-- recipe: name -->`` in the README."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- recipe: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert found, f"the README has no recipe {name!r}"
    return found.group(1)


def units(tmp_path: Path, *lines: str) -> list[str]:
    path = tmp_path / "Units.txt"
    path.write_text("".join(f"{line}\n" for line in lines))
    return ["--units_file", str(path)]


@contextlib.contextmanager
def added_to(module, code: str, table: dict | None = None):
    """Run ``code`` in ``module``'s namespace, as if appended to its file; the names it defines and the entries it
    adds to ``table`` are removed again on leaving."""
    names, keys = set(vars(module)), set(table or {})
    exec(compile(code, module.__file__, "exec"), vars(module))
    try:
        yield
    finally:
        for name in set(vars(module)) - names:
            delattr(module, name)
        for key in set(table or {}) - keys:
            del table[key]


def test_the_engine_recipe_is_an_engine_by_table_line_and_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_engines.py").write_text(recipe("engine"))
    monkeypatch.syspath_prepend(str(tmp_path))
    table = ENGINE_TABLE.read_text()  # the recipe's line pasted as the table's last entry, as a user would
    edited = table.replace("\n)}\n", "\n" + recipe("engine-table").rstrip("\n") + "\n)}\n", 1)
    assert edited != table
    module = types.ModuleType("edited_engine_table")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up there
    exec(compile(edited, str(ENGINE_TABLE), "exec"), module.__dict__)
    monkeypatch.setitem(ENGINES, "my_jacobi", module.ENGINES["my_jacobi"])
    common = TINY + units(tmp_path, "# none") + ["--K", "2", "--gamma", "0.5", "--active_share", "0.7"]
    try:
        ours = dol1.main(common + ["--training_mode", "my_jacobi", "--output_root", str(tmp_path / "a")])
        reference = dol1.main(common + ["--training_mode", "blockwise_sequential", "--output_root",
                                        str(tmp_path / "b")])
        for key, value in reference.center_model.state_dict().items():
            assert torch.equal(value, ours.center_model.state_dict()[key]), key
        assert ours.steps == reference.steps > 0 and ours.samples == reference.samples
        dotted = dol1.main(common + ["--training_mode", "my_engines.train_my_jacobi", "--output_root",
                                     str(tmp_path / "c")])
        assert all(torch.equal(v, dotted.center_model.state_dict()[k]) for k, v in ours.center_model.state_dict().items())
    finally:
        sys.modules.pop("my_engines", None)


def test_the_measurement_recipe_measures_from_units_txt(tmp_path):
    with added_to(MeasurementUnit, recipe("measurement")):
        frame = dol1.main(TINY + units(tmp_path, "- BlockWeightNorms") + ["--output_root", str(tmp_path)])
    log = tmp_path / "measurements" / f"BlockWeightNorms_{frame.run_id}.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["round"] for r in records] == [2, 4] and len(records[-1]["norms"]) == frame.n_blocks == 3
    expected = [torch.cat([p.flatten() for p in b.parameters()]).norm().item() for b in frame.center_model.blocks]
    assert records[-1]["norms"] == pytest.approx(expected)


def test_the_stopper_recipe_stops_from_units_txt(tmp_path):
    with added_to(StopperUnit, recipe("stopper")):
        frame = dol1.main(TINY + units(tmp_path, "- StopAboveLoss limit=0.5") + ["--output_root", str(tmp_path)])
    assert frame.round == 0 and frame.stop_kind == "above_limit" and "> 0.5" in frame.stop_reason


def test_the_model_recipe_trains_from_the_command_line(tmp_path):
    with added_to(Models, recipe("model"), Models.MODELS):
        frame = dol1.main(TINY + units(tmp_path, "# none") + ["--model", "wide_mlp", "--output_root", str(tmp_path)])
    assert [b.linear.out_features for b in frame.center_model.blocks] == [12, 10, 10] and frame.steps > 0


def test_the_dataset_recipe_trains_from_the_command_line(tmp_path):
    with added_to(datasets, recipe("dataset"), datasets.DATASETS):
        frame = dol1.main(TINY + units(tmp_path, "# none") + ["--dataset_name", "xor", "--rounds", "60", "--config",
                                                          "[16, 16]", "--batch_size", "64", "--step_size", "0.03",
                                                          "--output_root", str(tmp_path)])
    assert frame.data.input_shape == (2,) and frame.history[-1]["test_accuracy"] > 0.9
